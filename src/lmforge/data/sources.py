"""Read raw documents (txt, jsonl, jsonl.gz, built-in corpora, HF datasets) as a stream of str.

Nothing here loads a whole corpus; every problem is a DataError naming the file and line.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl.gz", ".jsonl", ".txt")
_GLOB_CHARS = ("*", "?", "[")


class DataError(ValueError):
    """A source cannot be read; the message names the file (and line) and says how to fix it."""


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """One raw-text source of documents."""

    name: str
    """Short name used in the manifest and by the mixture (e.g. "english")."""
    path: str
    """A file, directory (recursive, sorted), glob, `builtin:<name>` or `hf:<dataset>[:split]`."""
    text_field: str = "text"
    """Key holding the document text in each JSONL object or dataset row."""
    weight: float = 1.0
    """Relative sampling weight of this source when mixing sources."""
    max_bytes: int | None = None
    """Stop after roughly this many UTF-8 bytes of documents from this source; None reads all."""


def read_documents(source: SourceConfig) -> Iterator[str]:
    """Stream the non-empty documents of `source`, stopping once `max_bytes` is reached."""
    seen_bytes = 0
    num_docs = 0
    for text in _raw_documents(source):
        if not text:
            continue
        yield text
        num_docs += 1
        seen_bytes += len(text.encode("utf-8"))
        if source.max_bytes is not None and seen_bytes >= source.max_bytes:
            break
    if num_docs == 0:
        raise DataError(f"{source.path}: no documents (source {source.name!r})")
    log.debug("source %s: %d docs, %d bytes", source.name, num_docs, seen_bytes)


def _raw_documents(source: SourceConfig) -> Iterator[str]:
    """Dispatch on the kind of path: built-in corpus, HF dataset, or local files."""
    if source.path.startswith("builtin:"):
        from lmforge.data.corpus import iter_builtin  # corpus imports DataError from here

        return iter_builtin(source.path.removeprefix("builtin:"))
    if source.path.startswith("hf:"):
        return _read_hf(source.path.removeprefix("hf:"), source.text_field)
    return _read_files(resolve_files(source.path), source.text_field)


def resolve_files(path: str) -> list[Path]:
    """Expand a file, directory (recursive) or glob into a sorted list of readable files."""
    if any(c in path for c in _GLOB_CHARS):
        matches = [Path(p) for p in sorted(glob.glob(path, recursive=True))]
        files = [p for p in matches if p.is_file()]
        if not files:
            raise DataError(f"{path}: no files match this glob; check the pattern")
        return files
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and _suffix(p) is not None)
        if not files:
            raise DataError(f"{path}: no documents (no {', '.join(SUFFIXES)} files in directory)")
        return files
    if not root.exists():
        raise DataError(f"{path}: no such file or directory; check the source path")
    return [root]


def _suffix(path: Path) -> str | None:
    return next((s for s in SUFFIXES if path.name.endswith(s)), None)


def _read_files(files: Iterable[Path], text_field: str) -> Iterator[str]:
    for path in files:
        num_docs = 0
        for text in _read_file(path, text_field):
            if text:
                num_docs += 1
                yield text
        if num_docs == 0:
            raise DataError(f"{path}: no documents")


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    suffix = _suffix(path)
    if suffix == ".txt":
        yield _decode(path.read_bytes(), path, line=1, line_offset=0)
    elif suffix == ".jsonl":
        with open(path, "rb") as f:
            yield from _read_jsonl(f, path, text_field)
    elif suffix == ".jsonl.gz":
        try:
            with gzip.open(path, "rb") as f:
                yield from _read_jsonl(f, path, text_field)
        except (gzip.BadGzipFile, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip file ({e}); re-compress it") from e
    else:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")


def _read_jsonl(f: BinaryIO | gzip.GzipFile, path: Path, text_field: str) -> Iterator[str]:
    """One JSON object per line; blank lines are skipped."""
    offset = 0
    for lineno, raw in enumerate(f, start=1):
        line = _decode(raw, path, lineno, offset)
        offset += len(raw)
        if line.strip():
            yield _text_of(line, path, lineno, text_field)


def _decode(raw: bytes, path: Path, line: int, line_offset: int) -> str:
    """Decode UTF-8; on failure say which line and file byte offset is bad."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line += raw.count(b"\n", 0, e.start)
        bad = raw[e.start]
        raise DataError(
            f"{path}:{line}: invalid UTF-8 byte 0x{bad:02x} at byte offset {line_offset + e.start}"
            "; re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _text_of(line: str, path: Path, lineno: int, text_field: str) -> str:
    try:
        obj: Any = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})"
            "; each line must hold exactly one JSON object"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    if text_field not in obj:
        keys = ", ".join(sorted(obj)[:10])
        raise DataError(
            f"{path}:{lineno}: missing text field {text_field!r} (keys: {keys})"
            "; set text_field in the source config"
        )
    text = obj[text_field]
    if not isinstance(text, str):
        raise DataError(
            f"{path}:{lineno}: text field {text_field!r} must be a string,"
            f" got {type(text).__name__}"
        )
    return text


def _read_hf(spec: str, text_field: str) -> Iterator[str]:
    """`hf:<dataset name or local path>[:split]`, streamed via `datasets.load_dataset`."""
    try:
        import datasets  # optional dependency
    except ImportError:
        raise DataError(
            f"hf:{spec}: the 'datasets' package is not installed; run `pip install datasets`"
            " (or `pip install lmforge[hf]`)"
        ) from None
    name, _, split = spec.partition(":")
    rows = datasets.load_dataset(name, split=split or "train", streaming=True)
    for i, row in enumerate(rows):
        text = row.get(text_field)
        if not isinstance(text, str):
            raise DataError(f"hf:{spec}: row {i}: text field {text_field!r} missing or not a str")
        yield text
