"""JSON Lines reading shared by the chat data, benchmark task files and HumanEval problems."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


def json_lines(
    lines: Iterable[str | bytes], where: object, error: type[ValueError] = ValueError
) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line. A line that is not JSON, or not UTF-8,
    raises `error` naming `where:line`, so a bad file is reported, never half-read silently."""
    for line_no, line in enumerate(lines, 1):
        if line_no == 1:  # a UTF-8 byte-order mark, as some Windows editors write
            if isinstance(line, bytes):
                line = line.removeprefix(b"\xef\xbb\xbf")
            else:
                line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise error(f"{where}:{line_no}: not valid JSON ({reason})") from None
        except (ValueError, RecursionError) as e:  # an integer of > 4300 digits, deep nesting
            raise error(f"{where}:{line_no}: unreadable JSON ({type(e).__name__}: {e})") from None
        yield line_no, record
