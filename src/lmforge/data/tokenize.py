"""Turn sources into train/val token shards plus manifest.json; nothing else writes shards.

Output is all-or-nothing: it is built in a temp sibling folder that replaces `out_dir` on success.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmforge.data.shards import write_shard
from lmforge.data.sources import DataError, SourceConfig, read_documents
from lmforge.data.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
DEFAULT_SOURCES = (
    SourceConfig(name="english", path="builtin:english", max_bytes=500_000),
    SourceConfig(name="chinese", path="builtin:chinese", max_bytes=500_000),
    SourceConfig(name="code", path="builtin:code", max_bytes=500_000),
)
"""The demo corpus: ~1.5 MB in all (pydoc topics hold only ~0.47 MB, so English is the cap)."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which sources to tokenize and how to split and shard them."""

    sources: tuple[SourceConfig, ...] = DEFAULT_SOURCES
    """Raw-text sources, tokenized in this order; names must be unique."""
    heldout_fraction: float = 0.05
    """Share of documents (chosen by a hash of their text) that go to the val split."""
    shard_tokens: int = 50_000_000
    """Start a new shard file once this many tokens would be exceeded."""
    batch_docs: int = 256
    """Documents encoded per parallel `encode_batch` call."""

    def __post_init__(self) -> None:
        names = [s.name for s in self.sources]
        if not names or len(set(names)) != len(names):
            raise DataError(f"data.sources: need at least one source and unique names, got {names}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise DataError(
                f"data.heldout_fraction: must be in [0, 1), got {self.heldout_fraction}"
            )
        if self.shard_tokens <= 0 or self.batch_docs <= 0:
            raise DataError("data.shard_tokens and data.batch_docs must be positive")


def iter_corpus(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """(source name, document text) for every document of every source, in order."""
    for source in cfg.sources:
        for text in read_documents(source):
            yield source.name, text


def split_of(text: str, heldout_fraction: float) -> str:
    """ "val" or "train", decided by a hash of the text (identical texts share a split)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") / 2**64 < heldout_fraction else "train"


@dataclass
class _Doc:
    source: str
    ids: np.ndarray
    num_bytes: int


@dataclass
class _SplitWriter:
    """Buffers one split's documents and rolls over to a new shard at `shard_tokens`."""

    split: str
    out_dir: Path
    shard_tokens: int
    vocab_size: int
    tokenizer_sha256: str
    stats: dict[str, dict[str, int]]
    pending: list[_Doc] = field(default_factory=list)
    pending_tokens: int = 0
    files: list[str] = field(default_factory=list)

    @property
    def num_docs(self) -> int:
        return sum(s["docs"] for s in self.stats.values()) + len(self.pending)

    def add(self, doc: _Doc) -> None:
        if self.pending and self.pending_tokens + len(doc.ids) > self.shard_tokens:
            self.flush()
        self.pending.append(doc)
        self.pending_tokens += len(doc.ids)

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.split}_{len(self.files):05d}.bin"
        docs, doc_bytes = [d.ids for d in self.pending], [d.num_bytes for d in self.pending]
        write_shard(self.out_dir / name, docs, doc_bytes, self.vocab_size, self.tokenizer_sha256)
        for d in self.pending:
            counts = self.stats[d.source]
            counts["docs"] += 1
            counts["tokens"] += len(d.ids)
            counts["bytes"] += d.num_bytes
        self.files.append(name)
        self.pending, self.pending_tokens = [], 0


def tokenize_corpus(cfg: DataConfig, tokenizer: TextTokenizer, out_dir: Path) -> dict[str, Any]:
    """Tokenize every source into `out_dir` (train/val shards + manifest.json); return the manifest.

    On any error the temp folder is removed and an existing `out_dir` is left untouched.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory; choose another output path")
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _tokenize_into(cfg, tokenizer, tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s: %s", out_dir, {s: manifest["splits"][s]["tokens"] for s in SPLITS})
    return manifest


def _tokenize_into(cfg: DataConfig, tokenizer: TextTokenizer, out_dir: Path) -> dict[str, Any]:
    writers = {
        split: _SplitWriter(
            split=split,
            out_dir=out_dir,
            shard_tokens=cfg.shard_tokens,
            vocab_size=tokenizer.vocab_size,
            tokenizer_sha256=tokenizer.sha256,
            stats={s.name: {"docs": 0, "tokens": 0, "bytes": 0} for s in cfg.sources},
        )
        for split in SPLITS
    }
    caps = [s.max_bytes for s in cfg.sources]
    total = None if None in caps else sum(c for c in caps if c is not None)
    disable = not sys.stderr.isatty()
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=disable) as bar:
        for source in cfg.sources:
            for batch in _batches(read_documents(source), cfg.batch_docs):
                for text, ids in zip(batch, tokenizer.encode_batch(batch), strict=True):
                    doc = _Doc(source.name, np.asarray(ids, np.uint32), len(text.encode("utf-8")))
                    writers[split_of(text, cfg.heldout_fraction)].add(doc)
                    bar.update(doc.num_bytes)
    _ensure_both_splits(writers["train"], writers["val"])
    for writer in writers.values():
        writer.flush()
    manifest = _manifest(cfg, tokenizer, writers)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _ensure_both_splits(train: _SplitWriter, val: _SplitWriter) -> None:
    """With >= 2 docs, move one still-unwritten doc so neither split is empty.

    A writer always keeps its last document pending, so a non-empty split can give one away.
    """
    for src, dst in ((train, val), (val, train)):
        if dst.num_docs == 0 and src.num_docs >= 2:
            doc = src.pending.pop()
            src.pending_tokens -= len(doc.ids)
            dst.add(doc)
    if train.num_docs == 0 or val.num_docs == 0:
        raise DataError(
            f"the corpus has {train.num_docs + val.num_docs} document(s), too few for a train and a"
            " val split (a .txt file is one document); give more documents, e.g. a .jsonl file"
            " with one document per line"
        )


def _manifest(
    cfg: DataConfig, tokenizer: TextTokenizer, writers: dict[str, _SplitWriter]
) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    for split, w in writers.items():
        totals = {k: sum(s[k] for s in w.stats.values()) for k in ("docs", "tokens", "bytes")}
        splits[split] = {**totals, "shards": w.files}
    return {
        "format_version": 1,
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "heldout_fraction": cfg.heldout_fraction,
        "sources": {
            s.name: {split: writers[split].stats[s.name] for split in SPLITS} for s in cfg.sources
        },
        "splits": splits,
        "shards": [f for w in writers.values() for f in w.files],
    }


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move `tmp` to `out_dir`; an old `out_dir` is deleted only after the new one is in place."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old)
