"""Lines of a byte stream with a cap on each: JSON Lines readers split files, gzip and zstd
output without ever holding more than one capped line (a 60 MB line or a decompression bomb
costs the cap, not its size)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

CHUNK_BYTES = 1 << 20


def file_chunks(f: Any) -> Iterator[bytes]:
    """A binary file's bytes, CHUNK_BYTES at a time."""
    while chunk := f.read(CHUNK_BYTES):
        yield chunk


def bounded_lines(chunks: Iterable[bytes], cap: int) -> Iterator[bytes | int]:
    """The lines of a byte stream, without their newline; in place of a line of more than `cap`
    bytes, its length, its bytes dropped as they arrive: one enormous line (or a decompression
    bomb) costs no more memory than `cap`."""
    head: list[bytes] = []
    size = 0
    for chunk in chunks:
        *complete, rest = chunk.split(b"\n")
        for part in complete:
            if size + len(part) > cap:
                yield size + len(part)
            else:
                yield b"".join([*head, part]) if head else part
            head, size = [], 0
        size += len(rest)
        if size <= cap and rest:
            head.append(rest)
        elif size > cap:
            head = []
    if size > cap:
        yield size
    elif head:
        yield b"".join(head)
