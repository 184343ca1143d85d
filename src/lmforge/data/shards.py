"""Token shard file format: atomic write, validated memory-mapped read, per-document offsets.

Layout (little-endian): 256-byte header, tokens (uint16 or uint32), offsets int64[num_docs + 1]
(document i = tokens[offsets[i]:offsets[i + 1]]), doc_bytes int64[num_docs] (UTF-8 bytes per doc).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"LMFSHARD"
VERSION = 1
HEADER_BYTES = 256
_HEADER = struct.Struct("<8sIIQQQ32s")  # magic, version, dtype code, tokens, docs, vocab, sha256
_DTYPES: dict[int, np.dtype] = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
_FIX = "re-run 'lmforge tokenize'"


class ShardError(ValueError):
    """A shard file is missing, corrupt or inconsistent; the message names the file."""


@dataclass(frozen=True)
class Shard:
    """An opened shard; `tokens` is a read-only memory map, the rest is in memory."""

    path: Path
    tokens: np.ndarray
    offsets: np.ndarray
    doc_bytes: np.ndarray
    num_docs: int
    num_tokens: int
    vocab_size: int
    tokenizer_sha256: str

    def document(self, i: int) -> np.ndarray:
        """Token ids of document `i` (a view into the memory map). An id past the vocabulary
        is damage (a flipped bit): an error naming the shard here, not an opaque index error
        in the embedding, or a device-side assert on a GPU."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"{self.path}: document {i} out of range (num_docs={self.num_docs})")
        doc = self.tokens[self.offsets[i] : self.offsets[i + 1]]
        if len(doc) and int(doc.max()) >= self.vocab_size:
            raise ShardError(
                f"{self.path}: document {i} holds token id {int(doc.max())}, past the vocabulary"
                f" ({self.vocab_size}); {_FIX}"
            )
        return doc


def dtype_code(vocab_size: int) -> int:
    """1 (uint16) when every id fits in 16 bits, else 2 (uint32); past 32 bits ids would wrap."""
    if vocab_size > 2**32:
        raise ShardError(f"vocab_size {vocab_size}: token ids past 2^32 do not fit a shard")
    return 1 if vocab_size <= 2**16 else 2


def write_shard(
    path: str | os.PathLike[str],
    docs: Sequence[Sequence[int] | np.ndarray],
    doc_bytes: Sequence[int],
    vocab_size: int,
    tokenizer_sha256: str,
) -> None:
    """Write `docs` as one shard; written to a temp file in the same folder, then renamed."""
    path = Path(path)
    if len(doc_bytes) != len(docs):
        raise ShardError(f"{path}: {len(docs)} docs but {len(doc_bytes)} doc_bytes entries")
    code = dtype_code(vocab_size)
    arrays = [_checked_ids(path, d, vocab_size).astype(_DTYPES[code]) for d in docs]
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")
    header = _HEADER.pack(
        MAGIC, VERSION, code, int(offsets[-1]), len(docs), vocab_size, _sha_bytes(tokenizer_sha256)
    )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header.ljust(HEADER_BYTES, b"\0"))
            for a in arrays:
                f.write(a.tobytes())
            f.write(offsets.tobytes())
            f.write(np.asarray(doc_bytes, dtype="<i8").tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _checked_ids(path: Path, doc: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    ids = np.asarray(doc, dtype=np.int64)
    if ids.ndim != 1:
        raise ShardError(f"{path}: each document must be a 1-D sequence of ids")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ShardError(
            f"{path}: token id out of range [0, {vocab_size}): {ids.min()}..{ids.max()}"
        )
    return ids


def _sha_bytes(sha256_hex: str) -> bytes:
    try:
        raw = bytes.fromhex(sha256_hex)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ShardError(f"tokenizer_sha256 must be 64 hex digits, got {sha256_hex!r}")
    return raw


def open_shard(path: str | os.PathLike[str]) -> Shard:
    """Open and validate a shard: magic, version, dtype, exact size, monotone offsets."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: no such shard file; {_FIX}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < _HEADER.size or not head.startswith(MAGIC):
        raise ShardError(
            f"{path}: bad magic {head[:8]!r} (expected lmforge shard v{VERSION}); {_FIX}"
        )
    _, version, code, num_tokens, num_docs, vocab_size, sha = _HEADER.unpack_from(head)
    if version != VERSION:
        raise ShardError(f"{path}: shard version {version}, this lmforge reads v{VERSION}; {_FIX}")
    if code not in _DTYPES:
        raise ShardError(f"{path}: unknown dtype code {code} in header; {_FIX}")
    dtype = _DTYPES[code]
    expected = HEADER_BYTES + num_tokens * dtype.itemsize + (2 * num_docs + 1) * 8
    if size != expected:
        what = "truncated" if size < expected else "size mismatch"
        raise ShardError(f"{path}: {what}: header says {expected} bytes, file has {size}; {_FIX}")
    return _load(path, dtype, num_tokens, num_docs, vocab_size, sha.hex())


def _load(
    path: Path, dtype: np.dtype, num_tokens: int, num_docs: int, vocab_size: int, sha: str
) -> Shard:
    """Map the tokens read-only and read the (small) offset and byte-count tables."""
    tokens_end = HEADER_BYTES + num_tokens * dtype.itemsize
    tokens: np.ndarray
    if num_tokens:
        tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
    else:
        tokens = np.zeros(0, dtype=dtype)
        tokens.flags.writeable = False
    offsets = np.fromfile(path, dtype="<i8", count=num_docs + 1, offset=tokens_end)
    doc_bytes = np.fromfile(
        path, dtype="<i8", count=num_docs, offset=tokens_end + 8 * (num_docs + 1)
    )
    if offsets[0] != 0 or offsets[-1] != num_tokens or np.any(np.diff(offsets) < 0):
        raise ShardError(
            f"{path}: document offsets are not monotone from 0 to {num_tokens}; {_FIX}"
        )
    return Shard(
        path=path,
        tokens=tokens,
        offsets=offsets,
        doc_bytes=doc_bytes,
        num_docs=num_docs,
        num_tokens=num_tokens,
        vocab_size=vocab_size,
        tokenizer_sha256=sha,
    )


def list_shards(directory: str | os.PathLike[str], split: str) -> list[Path]:
    """Sorted `{split}_*.bin` files in `directory`; ShardError if there are none."""
    directory = Path(directory)
    shards = sorted(directory.glob(f"{split}_*.bin"))
    if not shards:
        raise ShardError(f"{directory}: no {split}_*.bin shards; {_FIX}")
    return shards
