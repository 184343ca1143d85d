"""Logging setup (rank 0 speaks), per-step metrics as JSONL, and progress bars."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is now (it may be swapped, e.g. by test capture)."""

    @property  # type: ignore[override]
    def stream(self):  # type: ignore[no-untyped-def]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # type: ignore[no-untyped-def]
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """One stderr handler; ranks other than 0 only report warnings and errors."""
    rank = int(os.environ.get("RANK", "0"))
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("lmforge")
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else logging.WARNING)
    root.propagate = False


def progress(total: int | None, desc: str, initial: int = 0, unit: str = "it") -> tqdm:
    """A tqdm bar on rank 0 only; silent when LMFORGE_NO_PROGRESS is set (tests, CI logs)."""
    disable = int(os.environ.get("RANK", "0")) != 0 or bool(os.environ.get("LMFORGE_NO_PROGRESS"))
    return tqdm(total=total, desc=desc, initial=initial, unit=unit, disable=disable, leave=False)


class MetricsWriter:
    """Appends one JSON object per line; flushed at once so a killed run keeps its history."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", encoding="utf-8")
        self.last_line_at: int | None = None

    def write(self, record: dict[str, Any]) -> None:
        self.last_line_at = self.file.tell()
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def rewrite_last(self, record: dict[str, Any]) -> None:
        """Replace the file's last line (a step's record, completed after the fact), whether
        this writer wrote it or found it there."""
        at = self.last_line_at
        if at is None:
            self.file.flush()
            data = Path(self.file.name).read_bytes().rstrip(b"\n")
            if not data:
                raise ValueError(f"{self.file.name}: no line to rewrite")
            at = data.rfind(b"\n") + 1
        self.file.truncate(at)
        self.file.seek(at)  # truncate leaves the position where it was
        self.write(record)

    def close(self) -> None:
        self.file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
