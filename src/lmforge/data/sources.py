"""Read raw documents (txt, jsonl[.gz|.zst], parquet, built-ins, HF datasets) as a stream of str.

Nothing here loads a whole corpus; every problem is a DataError naming the file and line. By
default the first one stops the read; an `on_error` handler can instead record it and go on.
"""

from __future__ import annotations

import glob
import gzip
import importlib
import json
import logging
import math
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.byte_lines import CHUNK_BYTES, bounded_lines, file_chunks

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl.gz", ".jsonl.zst", ".jsonl", ".parquet", ".txt")
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
    weight: float | None = None
    """Target share of pretraining tokens, relative to the other sources' weights; None (for
    every source) keeps each source's natural share, its token count."""
    max_bytes: int | None = None
    """Stop after roughly this many UTF-8 bytes of documents from this source; None reads all."""
    max_epochs: float | None = None
    """Pretraining reads this source at most this many times (2.0: every document exactly twice,
    0.5: half of them once); None repeats it as often as its weight asks."""
    max_document_bytes: int = 32 * 2**20
    """A document whose text has more UTF-8 bytes is bad input (an unsplit dump, a binary
    file): an error, or a reject."""

    def __post_init__(self) -> None:
        if self.weight is not None and not (math.isfinite(self.weight) and self.weight >= 0):
            raise DataError(f"source {self.name!r}: weight must be >= 0, got {self.weight}")
        if self.max_epochs is not None and self.max_epochs <= 0:
            raise DataError(f"source {self.name!r}: max_epochs must be > 0, got {self.max_epochs}")


ErrorHandler = Callable[[DataError], None]
"""Receives each bad input (its message names file:line) instead of it being raised."""


def read_documents(
    source: SourceConfig, on_error: ErrorHandler | None = None, keep_empty: bool = False
) -> Iterator[str]:
    """Stream the non-empty documents of `source`, stopping once `max_bytes` is reached; with
    `keep_empty`, empty ones too (tokenize counts them as dropped).

    Without `on_error` the first bad line or file raises; with it, the bad item is handed over
    and reading goes on with the next line (or the next file, when the file itself is bad).
    """
    seen_bytes = 0
    num_docs = 0
    for text in _raw_documents(source, on_error):
        if not text:
            if keep_empty:
                yield text
            continue
        yield text
        num_docs += 1
        seen_bytes += len(text.encode("utf-8"))
        if source.max_bytes is not None and seen_bytes >= source.max_bytes:
            break
    if num_docs == 0:
        raise DataError(f"{source.path}: no documents (source {source.name!r})")
    log.debug("source %s: %d docs, %d bytes", source.name, num_docs, seen_bytes)


def _raw_documents(source: SourceConfig, on_error: ErrorHandler | None) -> Iterator[str]:
    """Dispatch on the kind of path: built-in corpus, HF dataset, or local files."""
    if source.path.startswith("builtin:"):
        from lmforge.data.corpus import iter_builtin  # corpus imports DataError from here

        return iter_builtin(source.path.removeprefix("builtin:"))
    if source.path.startswith("hf:"):
        return _read_hf(source.path.removeprefix("hf:"), source, _raiser(on_error))
    return _read_files(resolve_files(source.path), source, _raiser(on_error))


def _raiser(on_error: ErrorHandler | None) -> ErrorHandler:
    def raise_it(error: DataError) -> None:
        raise error

    return on_error or raise_it


def resolve_files(path: str) -> list[Path]:
    """Expand a file, directory (recursive) or glob into a sorted list of readable files. A
    path that exists is taken as it is, even with glob characters (`corpus[1].jsonl`)."""
    if any(c in path for c in _GLOB_CHARS) and not Path(path).exists():
        matches = [Path(p) for p in sorted(glob.glob(path, recursive=True))]
        files = [p for p in matches if p.is_file()]
        if not files:
            raise DataError(f"{path}: no files match this glob; check the pattern")
        return files
    root = Path(path)
    if root.is_dir():
        visible = sorted(  # hidden files and folders (.ipynb_checkpoints, .git) are not data
            p
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        files = [p for p in visible if _suffix(p) is not None]
        if not files:
            raise DataError(f"{path}: no documents (no {', '.join(SUFFIXES)} files in directory)")
        if skipped := [p for p in visible if _suffix(p) is None]:
            names = ", ".join(str(p.relative_to(root)) for p in skipped[:5])
            more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
            log.warning(
                "%s: not reading %d file(s) of other types (%s%s); only %s are read",
                path,
                len(skipped),
                names,
                more,
                ", ".join(SUFFIXES),
            )
        return files
    if not root.exists():
        raise DataError(f"{path}: no such file or directory; check the source path")
    return [root]


def _suffix(path: Path) -> str | None:
    return next((s for s in SUFFIXES if path.name.lower().endswith(s)), None)


def _read_files(files: Iterable[Path], source: SourceConfig, bad: ErrorHandler) -> Iterator[str]:
    for path in files:
        num_docs, num_bad = 0, 0

        def bad_line(error: DataError) -> None:
            nonlocal num_bad
            num_bad += 1
            bad(error)

        try:
            for text in _read_file(path, source, bad_line):
                num_docs += bool(text)
                yield text
            if num_docs == 0 and num_bad == 0:
                raise DataError(f"{path}: no documents (empty file, or every text is empty)")
        except DataError as e:  # the file as a whole is bad: skip the rest of it
            bad(e)


def _read_file(path: Path, source: SourceConfig, bad: ErrorHandler) -> Iterator[str]:
    suffix = _suffix(path)
    if suffix == ".txt":
        _check_size(path.stat().st_size, source, f"{path}:1")
        raw = path.read_bytes()
        bom = len(UTF8_BOM) if raw.startswith(UTF8_BOM) else 0  # as for JSON lines
        yield _decode(raw[bom:], path, line=1, line_offset=bom)
    elif suffix == ".jsonl":
        with open(path, "rb") as f:
            yield from _read_jsonl(file_chunks(f), path, source, bad)
    elif suffix == ".jsonl.gz":
        try:
            with gzip.open(path, "rb") as f:
                yield from _read_jsonl(file_chunks(f), path, source, bad)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip file ({e}); re-compress it") from None
    elif suffix == ".jsonl.zst":
        zstandard = _optional("zstandard", path)
        try:
            yield from _read_jsonl(_zstd_chunks(path, zstandard), path, source, bad)
        except zstandard.ZstdError as e:
            raise DataError(f"{path}: corrupt zstd file ({e}); re-compress it") from None
    elif suffix == ".parquet":
        yield from _read_parquet(path, source, bad)
    else:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")


ZSTD_INPUT_BYTES = 256
"""Compressed bytes per decompress call: zstd expands a block of a few bytes to 128 KiB, so
256 bytes in give at most ~8 MiB out (a decompression bomb cannot take more at once)."""


def _zstd_chunks(path: Path, zstandard: Any) -> Iterator[bytes]:
    """The decompressed bytes of a zstd file, frame after frame. A file that ends inside a frame
    is an error: zstandard's stream reader returns what it has and stops without one."""
    decompressor = zstandard.ZstdDecompressor()
    frame, in_frame = decompressor.decompressobj(), False
    with open(path, "rb") as raw:
        while block := raw.read(CHUNK_BYTES):
            view = memoryview(block)
            for at in range(0, len(view), ZSTD_INPUT_BYTES):
                chunk: bytes | memoryview = view[at : at + ZSTD_INPUT_BYTES]
                while chunk:
                    yield frame.decompress(chunk)
                    in_frame = not frame.eof
                    chunk = frame.unused_data if frame.eof else b""
                    if frame.eof:
                        frame = decompressor.decompressobj()
    if in_frame:
        raise DataError(f"{path}: truncated zstd file (it ends inside a frame); re-compress it")


def _optional(module: str, path: Path) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(
            f"{path}: reading this format needs the {module!r} package; run "
            f"`pip install {module}` (or `pip install lmforge[data]`)"
        ) from None


JSON_ESCAPE_GROWTH = 6
"""A JSON line may be this many times its text's UTF-8 bytes (\\u0001 is 6 bytes for 1): the
raw-line cap that bounds memory before the text is known."""


def _check_size(num_bytes: int, source: SourceConfig, where: str) -> None:
    if num_bytes > source.max_document_bytes:
        raise DataError(
            f"{where}: document of {num_bytes:,} bytes exceeds max_document_bytes "
            f"({source.max_document_bytes:,}) of source {source.name!r}; split it into documents"
            " or raise the limit"
        )


def _read_jsonl(
    chunks: Iterable[bytes], path: Path, source: SourceConfig, bad: ErrorHandler
) -> Iterator[str]:
    """One JSON object per line; blank lines are skipped; a bad line goes to `bad`."""
    offset = 0
    cap = JSON_ESCAPE_GROWTH * source.max_document_bytes
    for lineno, raw in enumerate(bounded_lines(chunks, cap), start=1):
        if isinstance(raw, int):  # too big even escaped: its bytes were not kept
            try:
                _check_size(raw, source, f"{path}:{lineno}")
            except DataError as e:
                bad(e)
            offset += raw + 1
            continue
        if lineno == 1 and raw.startswith(UTF8_BOM):  # written by some Windows editors
            raw = raw[len(UTF8_BOM) :]
            offset = len(UTF8_BOM)
        try:
            line = _decode(raw, path, lineno, offset)
            if line.strip():
                text = _text_of(json_loads(line, path, lineno), path, lineno, source.text_field)
                _check_size(len(text.encode("utf-8")), source, f"{path}:{lineno}")
                yield text
        except DataError as e:
            bad(e)
        offset += len(raw) + 1  # and its newline


def _read_parquet(path: Path, source: SourceConfig, bad: ErrorHandler) -> Iterator[str]:
    """Rows of the text column, a record batch at a time (row numbers from 1 stand for lines)."""
    pq = _optional("pyarrow.parquet", path)
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet bytes
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    names = table.schema_arrow.names
    if source.text_field not in names:
        raise DataError(
            f"{path}: missing text column {source.text_field!r} (columns: {', '.join(names[:10])})"
            "; set text_field in the source config"
        )
    row = 0
    batches = table.iter_batches(batch_size=1024, columns=[source.text_field])
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # pyarrow's OSError / ArrowException for a damaged page
            raise DataError(f"{path}: corrupt parquet data after row {row} ({e})") from None
        if batch is None:
            break
        for text in batch.column(0).to_pylist():
            row += 1
            try:
                _check_size(
                    len(text.encode("utf-8")) if isinstance(text, str) else 0,
                    source,
                    f"{path}:{row}",
                )
                yield _text_of({source.text_field: text}, path, row, source.text_field)
            except DataError as e:
                bad(e)


UTF8_BOM = b"\xef\xbb\xbf"


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


def json_loads(line: str, path: Path | str, lineno: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})"
            "; each line must hold exactly one JSON object"
        ) from None
    except (ValueError, RecursionError) as e:  # an integer of > 4300 digits, deep nesting
        raise DataError(f"{path}:{lineno}: unreadable JSON ({type(e).__name__}: {e})") from None


def _text_of(obj: Any, path: Path | str, lineno: int, text_field: str) -> str:
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    if obj.get(text_field) is None:  # datasets fills a column missing from a row with None
        if text_field in obj:  # (or, from `datasets`, missing from this row)
            raise DataError(f"{path}:{lineno}: text field {text_field!r} is null or missing")
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
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escape: valid JSON, not valid text
        raise DataError(
            f"{path}:{lineno}: text holds a lone surrogate {text[e.start]!r} (a broken"
            " \\uXXXX escape), not text"
        ) from None
    return text


def _read_hf(spec: str, source: SourceConfig, bad: ErrorHandler) -> Iterator[str]:
    """`hf:<dataset name or local path>[:split]`, streamed via `datasets.load_dataset`.

    A local path is a folder of data files or a file (`datasets` picks the builder from the
    extension); anything else is a hub name, which needs the network.
    """
    try:
        import datasets  # optional dependency
    except ImportError:
        raise DataError(
            f"hf:{spec}: the 'datasets' package is not installed; run `pip install datasets`"
            " (or `pip install lmforge[hf]`)"
        ) from None
    name, _, split = spec.rpartition(":") if _has_split(spec) else (spec, "", "")
    rows = iter(_load_hf(datasets, name, split or "train"))
    i = 0
    while True:
        try:
            row = next(rows, None)
        except Exception as e:  # datasets/pyarrow's own parse errors: the rest is unreadable
            row = None
            bad(DataError(f"hf:{spec}: unreadable after row {i} ({type(e).__name__}: {e})"))
        if row is None:
            break
        i += 1
        try:
            _check_size(len(str(row.get(source.text_field, "")).encode()), source, f"hf:{spec}:{i}")
            yield _text_of(row, f"hf:{spec}", i, source.text_field)
        except DataError as e:
            bad(e)


def hf_local_files(spec: str) -> list[Path]:
    """The files behind `hf:<local file or folder>[:split]` (what a restart must find unchanged);
    [] for a hub name."""
    name = spec.removeprefix("hf:")
    name = name.rpartition(":")[0] if _has_split(name) else name
    path = Path(name)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []


def _has_split(spec: str) -> bool:
    """`name:split` unless the part after the last colon is a path (Windows drives, URLs)."""
    head, sep, tail = spec.rpartition(":")
    return bool(sep and head and tail) and "/" not in tail and "\\" not in tail


def _load_hf(datasets: Any, name: str, split: str) -> Any:
    path = Path(name)
    if path.is_file():
        builder = _HF_BUILDERS.get(_suffix(path) or path.suffix)
        if builder is None:
            raise DataError(f"hf:{name}: datasets cannot read this file type")
        return datasets.load_dataset(builder, data_files=str(path), split=split, streaming=True)
    return datasets.load_dataset(name, split=split, streaming=True)


_HF_BUILDERS = {
    ".jsonl": "json",
    ".jsonl.gz": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".csv": "csv",
    ".json": "json",
}
