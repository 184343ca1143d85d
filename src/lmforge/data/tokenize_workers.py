"""The per-document work of tokenize, in worker processes: clean, sign for dedup, tokenize.

Batches go out in input order and come back in input order, so the shards do not depend on the
number of workers; at most 2 x workers batches are in flight, which bounds memory. A bad input
(a DataError from reading) passes through as a placeholder and is counted as dropped.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lmforge.data.clean import CleanConfig, clean
from lmforge.data.dedup import DedupConfig, Signature, signature
from lmforge.data.sources import DataError
from lmforge.data.tokenizer import TextTokenizer


def split_of(text: str, heldout_fraction: float) -> str:
    """ "val" or "train", decided by a hash of the text (identical texts share a split)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") / 2**64 < heldout_fraction else "train"


@dataclass
class ProcessedDoc:
    """A document after the workers: kept (ids set) or dropped (reason set)."""

    num_bytes: int
    split: str
    reason: str | None
    sig: Signature | None
    ids: np.ndarray | None


class Workers:
    """Clean + signature + tokenize batches, in order, in-process or in a bounded process pool."""

    def __init__(
        self,
        clean_cfg: CleanConfig,
        dedup_cfg: DedupConfig,
        heldout_fraction: float,
        workers: int,
        tokenizer: TextTokenizer,
    ) -> None:
        self.settings = (clean_cfg, dedup_cfg, heldout_fraction)
        self.tokenizer = tokenizer
        self.num = workers or os.cpu_count() or 1
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Workers:
        if self.num > 1:
            self.pool = ProcessPoolExecutor(
                self.num,
                mp_context=get_context("spawn"),  # fork would copy tokenizers' thread pool
                initializer=_init_worker,
                initargs=(*self.settings, self.tokenizer.backend.to_str(), os.getpid()),
            )
        else:
            _init_worker(*self.settings, None, None, self.tokenizer)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def map(
        self, batches: Iterable[tuple[int, list[str | DataError]]]
    ) -> Iterator[tuple[int, list[str | DataError], list[ProcessedDoc]]]:
        """Each (tag, batch) with its processed documents, in input order; bad inputs pass
        through. At most 2 × workers batches are in flight, which bounds memory."""
        if self.pool is None:
            for tag, batch in batches:
                yield tag, batch, _merge(batch, process_batch(_texts(batch)))
            return
        in_flight: deque[tuple[int, list[str | DataError], Future[list[ProcessedDoc]]]] = deque()
        for tag, batch in batches:
            in_flight.append((tag, batch, self.pool.submit(process_batch, _texts(batch))))
            if len(in_flight) >= 2 * self.num:
                done_tag, done, fut = in_flight.popleft()
                yield done_tag, done, _merge(done, fut.result())
        while in_flight:
            done_tag, done, fut = in_flight.popleft()
            yield done_tag, done, _merge(done, fut.result())


def _texts(batch: list[str | DataError]) -> list[str]:
    return [item for item in batch if isinstance(item, str)]


def _merge(batch: list[str | DataError], docs: list[ProcessedDoc]) -> list[ProcessedDoc]:
    """Put a placeholder for each bad input back among the processed documents."""
    it = iter(docs)
    return [
        next(it) if isinstance(item, str) else ProcessedDoc(0, "train", "bad_input", None, None)
        for item in batch
    ]


_worker: dict[str, Any] = {}


def _init_worker(
    clean_cfg: CleanConfig,
    dedup_cfg: DedupConfig,
    heldout_fraction: float,
    tokenizer_json: str | None,
    parent: int | None = None,
    tokenizer: TextTokenizer | None = None,
) -> None:
    if parent is not None:
        _end_with(parent)
    if tokenizer is None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
        assert tokenizer_json is not None
        tokenizer = TextTokenizer(Tokenizer.from_str(tokenizer_json), tokenizer_json)
    _worker.update(clean=clean_cfg, dedup=dedup_cfg, heldout=heldout_fraction, tok=tokenizer)


def _end_with(parent: int) -> None:
    """A worker ends when the tokenize that started it is killed (SIGKILL, pre-emption): it
    would wait on its queue forever. Linux's parent-death signal; elsewhere nothing."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # it died before the signal was set
        os._exit(1)


def process_batch(batch: list[str]) -> list[ProcessedDoc]:
    """Clean, sign and tokenize one batch (the per-document work that parallelizes)."""
    clean_cfg, dedup_cfg, tokenizer = _worker["clean"], _worker["dedup"], _worker["tok"]
    docs, kept = [], []
    for raw in batch:
        text, reason = clean(raw, clean_cfg) if raw else ("", "empty")
        num_bytes = len(text.encode("utf-8"))
        sig = signature(text, dedup_cfg) if reason is None and _dedups(dedup_cfg) else None
        docs.append(ProcessedDoc(num_bytes, split_of(text, _worker["heldout"]), reason, sig, None))
        if reason is None:
            kept.append((len(docs) - 1, text))
    encoded = tokenizer.encode_batch([t for _, t in kept]) if kept else []
    for (i, _), ids in zip(kept, encoded, strict=True):
        docs[i].ids = np.asarray(ids, dtype=np.uint32)
    return docs


def _dedups(cfg: DedupConfig) -> bool:
    return cfg.exact or cfg.near


def input_batches(
    items: Iterable[str | DataError], max_docs: int, max_bytes: int
) -> Iterator[list[str | DataError]]:
    """Batches of at most max_docs items and (past their first document) max_bytes of text."""
    batch: list[str | DataError] = []
    size = 0
    for item in items:
        n = len(item) if isinstance(item, str) else 0  # characters: cheap, close enough
        if batch and (len(batch) == max_docs or size + n > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += n
    if batch:
        yield batch
