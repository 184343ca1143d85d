"""Turn sources into cleaned, deduplicated train/val token shards plus manifest.json.

Per source: read (sources.py) → clean and filter (clean.py) → drop duplicates (dedup.py) →
tokenize → split by a hash of the text → `{split}_{source}_{n}.bin` shards. Cleaning, MinHash
signatures and tokenization run in worker processes on batches of documents
(tokenize_workers.py); reading, the dedup decision and writing stay in this process, in order,
so the output does not depend on the number of workers.

The output appears all at once: work happens in `<out>.partial/`, renamed to `<out>` at the end.
Each time a source's train shard fills, the partial folder records a restart point (shards with
checksums, counts, dedup state, input position); an interrupted run started again with the same
config and inputs verifies those shards and continues after them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import pickle
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmforge.data.clean import DROP_REASONS
from lmforge.data.config import DataConfig
from lmforge.data.dedup import Deduplicator
from lmforge.data.shards import ShardError, open_shard, write_shard
from lmforge.data.sources import (
    DataError,
    SourceConfig,
    hf_local_files,
    read_documents,
    resolve_files,
)
from lmforge.data.tokenize_workers import ProcessedDoc, Workers, input_batches
from lmforge.data.tokenize_workers import split_of as split_of  # the pipeline's held-out text
from lmforge.data.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
_BATCH_BYTES = 1 << 20
"""Text per unit of work (with `batch_docs`): one 2.5 MB batch of code files would keep a worker
busy for seconds while the others wait at the end of a source."""
FORMAT_VERSION = 2
RESTART_VERSION = 2
"""What a restart point's counts mean (2: `read` counts empty documents, dropped as
"empty"); a restart point of another version is not used."""


def iter_corpus(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """(source name, document text) for every document of every source, in order (raw)."""
    for source in cfg.sources:
        for text in read_documents(source):
            yield source.name, text


def read_manifest(shards_dir: Path) -> dict[str, Any]:
    """The manifest of a finished tokenize run; ShardError if there is none or it is outdated."""
    path = Path(shards_dir) / "manifest.json"
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path}: no manifest; run 'lmforge tokenize' first") from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: corrupt manifest ({e}); re-run 'lmforge tokenize'") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(
            f"{path}: written by another lmforge version (format "
            f"{manifest.get('format_version')}, need {FORMAT_VERSION}); re-run 'lmforge tokenize'"
        )
    return manifest


@dataclass
class _ShardWriter:
    """Buffers one (source, split)'s documents and writes a shard at `shard_tokens`."""

    source: str
    split: str
    out_dir: Path
    shard_tokens: int
    vocab_size: int
    tokenizer_sha256: str
    docs: int = 0
    tokens: int = 0
    bytes: int = 0
    shards: list[str] = field(default_factory=list)
    checksums: dict[str, str] = field(default_factory=dict)
    pending: list[tuple[np.ndarray, int]] = field(default_factory=list)
    pending_tokens: int = 0

    def add(self, ids: np.ndarray, num_bytes: int) -> bool:
        """Buffer a document; True when a shard was written to make room for it."""
        wrote = bool(self.pending) and self.pending_tokens + len(ids) > self.shard_tokens
        if wrote:
            self.flush()
        self.pending.append((ids, num_bytes))
        self.pending_tokens += len(ids)
        return wrote

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.split}_{self.source}_{len(self.shards):05d}.bin"
        ids, nbytes = [d for d, _ in self.pending], [b for _, b in self.pending]
        write_shard(self.out_dir / name, ids, nbytes, self.vocab_size, self.tokenizer_sha256)
        self.docs += len(ids)
        self.tokens += self.pending_tokens
        self.bytes += sum(nbytes)
        self.shards.append(name)
        self.checksums[name] = _sha256(self.out_dir / name)
        self.pending, self.pending_tokens = [], 0

    def take_last(self) -> tuple[np.ndarray, int]:
        """Remove and return the last document, rewriting the last shard if it is written."""
        if self.pending:
            ids, num_bytes = self.pending.pop()
            self.pending_tokens -= len(ids)
            return ids, num_bytes
        name = self.shards[-1]
        shard = open_shard(self.out_dir / name)
        docs = [np.array(shard.document(i)) for i in range(shard.num_docs)]
        doc_bytes = [int(b) for b in shard.doc_bytes]
        del shard
        ids, num_bytes = docs.pop(), doc_bytes.pop()
        if docs:
            write_shard(
                self.out_dir / name, docs, doc_bytes, self.vocab_size, self.tokenizer_sha256
            )
            self.checksums[name] = _sha256(self.out_dir / name)
        else:
            (self.out_dir / name).unlink()
            self.shards.pop()
            del self.checksums[name]
        self.docs, self.tokens, self.bytes = (
            self.docs - 1,
            self.tokens - len(ids),
            self.bytes - num_bytes,
        )
        return ids, num_bytes

    @property
    def total_docs(self) -> int:
        return self.docs + len(self.pending)

    def summary(self) -> dict[str, Any]:
        return {
            "docs": self.docs,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "shards": self.shards,
        }

    def state(self) -> dict[str, Any]:
        return {**self.summary(), "checksums": self.checksums}

    def restore(self, state: dict[str, Any]) -> None:
        self.docs, self.tokens, self.bytes = state["docs"], state["tokens"], state["bytes"]
        self.shards, self.checksums = list(state["shards"]), dict(state["checksums"])


def tokenize_corpus(cfg: DataConfig, tokenizer: TextTokenizer, out_dir: Path) -> dict[str, Any]:
    """Tokenize every source into `out_dir` (shards + manifest.json); return the manifest.

    An existing `out_dir` is replaced only on success. After an error or interruption the
    finished shards stay in `<out_dir>.partial/` for the next run with the same inputs.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory; choose another output path")
    work = out_dir.with_name(f"{out_dir.name}.partial")
    fingerprint = _fingerprint(cfg, tokenizer)
    run = _Run(cfg, tokenizer, work, fingerprint)
    try:
        manifest = run.execute()
    except BaseException:
        if run.restart_points == 0 and not run.resumed:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log.warning("kept finished shards in %s; run again to continue", work)
        raise
    _replace_dir(work, out_dir)
    log.info("wrote %s: %s", out_dir, {s: manifest["splits"][s]["tokens"] for s in SPLITS})
    return manifest


class _Run:
    """One tokenize run over a work folder: restart points, per-source loop, manifest."""

    def __init__(
        self, cfg: DataConfig, tokenizer: TextTokenizer, work: Path, fingerprint: str
    ) -> None:
        self.cfg, self.tokenizer, self.work, self.fingerprint = cfg, tokenizer, work, fingerprint
        self.writers = {
            (s.name, split): _ShardWriter(
                source=s.name,
                split=split,
                out_dir=work,
                shard_tokens=cfg.shard_tokens,
                vocab_size=tokenizer.vocab_size,
                tokenizer_sha256=tokenizer.sha256,
            )
            for s in cfg.sources
            for split in SPLITS
        }
        self.dropped: dict[str, dict[str, int]] = {s.name: {} for s in cfg.sources}
        self.read: dict[str, int] = {s.name: 0 for s in cfg.sources}
        self.dedup = Deduplicator(cfg.dedup)
        self.source_index, self.restart_points, self.resumed = 0, 0, False
        self.rejects_path = work / "rejects.jsonl"

    def execute(self) -> dict[str, Any]:
        self.resumed = self._restore()
        if not self.resumed:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work.mkdir(parents=True)
        with (
            Workers(
                self.cfg.clean,
                self.cfg.dedup,
                self.cfg.heldout_fraction,
                self.cfg.workers,
                self.tokenizer,
            ) as workers,
            self._progress_bar() as bar,
        ):
            for index, batch, docs in workers.map(self._batches()):
                if index != self.source_index:  # every earlier source is complete
                    self._finish_sources_before(index)
                self._consume(self.cfg.sources[index].name, batch, docs, bar)
        self._ensure_both_splits()
        for writer in self.writers.values():
            writer.flush()
        manifest = self._manifest()
        (self.work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (self.work / "progress.json").unlink(missing_ok=True)
        (self.work / "dedup.pkl").unlink(missing_ok=True)
        return manifest

    def _progress_bar(self) -> tqdm:
        caps = [s.max_bytes for s in self.cfg.sources]
        total = None if None in caps else sum(c for c in caps if c is not None)
        return tqdm(
            total=total, unit="B", unit_scale=True, desc="tokenize", disable=not sys.stderr.isatty()
        )

    def _batches(self) -> Iterator[tuple[int, list[str | DataError]]]:
        """Work for the pool: each source's remaining items in batches, source after source,
        so workers never wait for a source to drain before the next one starts."""
        for index in range(self.source_index, len(self.cfg.sources)):
            source = self.cfg.sources[index]
            done = self.read[source.name]
            if done:
                log.info("source %s: skipping %d items done before the restart", source.name, done)
            items = itertools.islice(self._items(source), done, None)
            for batch in input_batches(items, self.cfg.batch_docs, _BATCH_BYTES):
                yield index, batch

    def _finish_sources_before(self, index: int) -> None:
        """Write what the finished sources still hold and record a restart point."""
        for source in self.cfg.sources[self.source_index : index]:
            self._flush_source(source.name)
        self.source_index = index
        self._save_restart_point()

    def _consume(
        self, source: str, batch: list[str | DataError], docs: list[ProcessedDoc], bar: tqdm
    ) -> None:
        """Dedup and write one processed batch; a restart point each time a shard fills."""
        checkpoint = False
        for item, doc in zip(batch, docs, strict=True):
            self.read[source] += 1
            bar.update(doc.num_bytes)
            reason = doc.reason
            if isinstance(item, DataError):
                self._reject(source, item)
            elif reason is None and doc.sig is not None:
                reason = self.dedup.check(f"{source}:{self.read[source]}", doc.sig)
            if reason is not None:
                counts = self.dropped[source]
                counts[reason] = counts.get(reason, 0) + 1
                continue
            assert doc.ids is not None
            checkpoint |= self.writers[source, doc.split].add(doc.ids, doc.num_bytes)
        if checkpoint:
            self._flush_source(source)
            self._save_restart_point()

    def _items(self, source: SourceConfig) -> Iterator[str | DataError]:
        """The source's documents, and with on_error=skip its bad inputs, in reading order."""
        if self.cfg.on_error == "raise":
            yield from read_documents(source, keep_empty=True)
            return
        errors: list[DataError] = []
        for text in read_documents(source, on_error=errors.append, keep_empty=True):
            yield from errors
            errors.clear()
            yield text
        yield from errors

    def _reject(self, source: str, error: DataError) -> None:
        with open(self.rejects_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"source": source, "error": str(error)}, ensure_ascii=False) + "\n")

    def _flush_source(self, source: str) -> None:
        for split in SPLITS:
            self.writers[source, split].flush()

    def _save_restart_point(self) -> None:
        """Record everything needed to continue from here (all shards so far are written)."""
        _atomic_write(self.work / "dedup.pkl", pickle.dumps(self.dedup))
        state = {
            "fingerprint": self.fingerprint,
            "source_index": self.source_index,
            "read": self.read,
            "dropped": self.dropped,
            "rejects_bytes": self.rejects_path.stat().st_size if self.rejects_path.exists() else 0,
            "dedup_sha256": _sha256(self.work / "dedup.pkl"),
            "writers": {f"{s}/{split}": w.state() for (s, split), w in self.writers.items()},
        }
        _atomic_write(self.work / "progress.json", json.dumps(state, indent=1).encode())
        self.restart_points += 1

    def _restore(self) -> bool:
        """Continue from the work folder's restart point if it matches this run exactly."""
        path = self.work / "progress.json"
        if not path.exists():
            return False
        try:
            state = json.loads(path.read_text())
            if state["fingerprint"] != self.fingerprint:
                log.warning("%s: inputs or config changed since; starting over", self.work)
                return False
            if _sha256(self.work / "dedup.pkl") != state["dedup_sha256"]:
                raise ValueError("dedup state checksum mismatch")
            for ws in state["writers"].values():
                for name in ws["shards"]:
                    if _sha256(self.work / name) != ws["checksums"][name]:
                        raise ValueError(f"{name}: checksum mismatch")
        except (OSError, ValueError, KeyError) as e:
            log.warning("%s: unusable restart point (%s); starting over", self.work, e)
            return False
        self.dedup = pickle.loads((self.work / "dedup.pkl").read_bytes())
        for key, ws in state["writers"].items():
            source, split = key.rsplit("/", 1)
            self.writers[source, split].restore(ws)
        self.read, self.dropped = state["read"], state["dropped"]
        self.source_index = state["source_index"]
        keep = {n for ws in state["writers"].values() for n in ws["shards"]}
        keep |= {"progress.json", "dedup.pkl", "rejects.jsonl"}
        for p in self.work.iterdir():
            if p.name not in keep:  # written after the restart point
                p.unlink()
        if self.rejects_path.exists():
            with open(self.rejects_path, "r+b") as f:
                f.truncate(state["rejects_bytes"])
        log.info("%s: continuing after %d finished shards", self.work, len(keep) - 3)
        return True

    def _ensure_both_splits(self) -> None:
        """With >= 2 documents, move one so that neither split is empty (tiny corpora)."""

        def count(split: str) -> int:
            return sum(w.total_docs for (_, sp), w in self.writers.items() if sp == split)

        for src, dst in (("train", "val"), ("val", "train")):
            if count(dst) == 0 and count(src) >= 2:
                giver = max(
                    (w for (_, sp), w in self.writers.items() if sp == src),
                    key=lambda w: w.total_docs,
                )
                ids, num_bytes = giver.take_last()
                self.writers[giver.source, dst].add(ids, num_bytes)
        train, val = count("train"), count("val")
        if train == 0 or val == 0:
            raise DataError(
                f"the corpus has {train + val} document(s) after cleaning: too few for a train"
                " and a val split (a .txt file is one document); give more documents, e.g. a"
                " .jsonl file with one document per line"
            )

    def _manifest(self) -> dict[str, Any]:
        sources: dict[str, Any] = {}
        for s in self.cfg.sources:
            sources[s.name] = {split: self.writers[s.name, split].summary() for split in SPLITS} | {
                "read": self.read[s.name],
                "dropped": dict(sorted(self.dropped[s.name].items())),
                "weight": s.weight,
                "max_epochs": s.max_epochs,
            }
        splits: dict[str, Any] = {}
        for split in SPLITS:
            ws = [self.writers[s.name, split] for s in self.cfg.sources]
            splits[split] = {
                "docs": sum(w.docs for w in ws),
                "tokens": sum(w.tokens for w in ws),
                "bytes": sum(w.bytes for w in ws),
                "shards": [name for w in ws for name in w.shards],
            }
        return {
            "format_version": FORMAT_VERSION,
            "tokenizer_sha256": self.tokenizer.sha256,
            "vocab_size": self.tokenizer.vocab_size,
            "heldout_fraction": self.cfg.heldout_fraction,
            **_shaping_settings(self.cfg),
            "sources": sources,
            "splits": splits,
            "shards": splits["train"]["shards"] + splits["val"]["shards"],
            "drop_reasons": [*DROP_REASONS, "exact_duplicate", "near_duplicate", "bad_input"],
        }


def _shaping_settings(cfg: DataConfig) -> dict[str, Any]:
    """The settings besides sources and tokenizer that decide what the shards hold, as JSON
    holds them (tuples as lists)."""
    now = {"clean": asdict(cfg.clean), "dedup": asdict(cfg.dedup)}
    return dict(json.loads(json.dumps(now, default=list)))


def stale_settings(manifest: dict[str, Any], cfg: DataConfig) -> list[str]:
    """The data settings that shaped the shards and differ in `cfg` (a recipe edited after
    tokenize): their shards are not what it asks for. Keys a manifest lacks are not judged."""
    now = {"heldout_fraction": cfg.heldout_fraction, **_shaping_settings(cfg)}
    return [k for k in now if k in manifest and manifest[k] != now[k]]


def _fingerprint(cfg: DataConfig, tokenizer: TextTokenizer) -> str:
    """Config + tokenizer + every input file's size and mtime (local `hf:` folders too):
    what a restart must match. The worker count and what only the loader reads (weights,
    max_epochs, mixture stages) leave the shards as they are, so they are left out."""
    cfg = replace(
        cfg,
        workers=0,
        mixture_stages=(),
        sources=tuple(replace(s, weight=None, max_epochs=None) for s in cfg.sources),
    )
    inputs: list[Any] = []
    for s in cfg.sources:
        if s.path.startswith("builtin:"):
            files = []
        elif s.path.startswith("hf:"):
            files = hf_local_files(s.path)  # a hub dataset's revision is not known offline
        else:
            files = resolve_files(s.path)
        inputs.append([s.path, [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]])
    blob = json.dumps(
        [FORMAT_VERSION, RESTART_VERSION, asdict(cfg), tokenizer.sha256, inputs],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
