"""A run's checkpoint folders on disk: which are complete and intact, the newest and the best,
and which to prune. No torch here: listing and verifying a run's checkpoints (`lmforge runs`,
`report`, resume's fallback) needs only the files.

A checkpoint `step_00000100/` is complete once it holds `MANIFEST.json`, written last, with
every file's size and sha256; `checkpoint.py` writes and reads what the files hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

MANIFEST = "MANIFEST.json"
FORMAT = "lmforge-checkpoint-v2"
"""v2: model and optimizer state in a DCP folder keyed by parameter name (v1: optimizer.pt)."""
STATE = "state"
REQUIRED_FILES = ("trainer.json", "rng.pt", f"{STATE}/.metadata")
"""In every checkpoint, whatever else it holds (model.safetensors is optional)."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupted."""


def as_umask_allows(path: Path) -> None:
    """Give a file the mode a plain open() would (0666 less the umask): safetensors' save_file
    writes 0600, which other users of a shared checkpoint or export cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run dir a checkpoint is in (RUN/checkpoints/step_*, given relative or not), None
    for one copied elsewhere."""
    checkpoint = checkpoint.absolute()
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def completed_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints renamed into place (with a manifest), oldest first."""
    return sorted(p for p in directory.glob("step_*") if (p / MANIFEST).exists())


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint folder's name (step_00000100: 100)."""
    return int(path.name.removeprefix("step_"))


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest completed checkpoint, if any."""
    done = completed_checkpoints(directory)
    return done[-1] if done else None


def best_checkpoint(directory: Path) -> Path | None:
    """The completed checkpoint with the lowest held-out loss among those scored at the newest
    scored one's sequence length (after a context extension, the losses of the shorter stage
    measured other rows), if any has one."""
    scored = [(*val_score(p), p) for p in completed_checkpoints(directory)]
    scored = [(loss, seq_len, p) for loss, seq_len, p in scored if loss is not None]
    if not scored:
        return None
    newest_len = scored[-1][1]
    return min((loss, p) for loss, seq_len, p in scored if seq_len == newest_len)[1]


def val_score(path: Path) -> tuple[float | None, int | None]:
    """(val_loss, val_seq_len) from a checkpoint's trainer.json; None where not recorded."""
    try:
        trainer = json.loads((path / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None, None
    loss, seq_len = trainer.get("val_loss"), trainer.get("val_seq_len")
    return (float(loss) if loss is not None else None), seq_len


def verify_checkpoint(path: Path) -> None:
    """Check every file against the manifest; raise CheckpointError naming the first bad one."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not manifest_path.exists():
        raise CheckpointError(f"{manifest_path}: missing; the checkpoint is incomplete")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_path}: unreadable ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(m, dict) and {"bytes", "sha256"} <= m.keys() for m in files.values()
    ):
        raise CheckpointError(f"{manifest_path}: not a checkpoint manifest (no files table)")
    for name in REQUIRED_FILES:
        if name not in files:
            raise CheckpointError(f"{manifest_path}: does not list {name}; it was edited")
    for name, meta in files.items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        size = file.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(
                f"{file}: truncated or changed: {size} bytes, manifest says {meta['bytes']}"
            )
        if sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{file}: checksum mismatch; the file is corrupted")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    files = {}
    for file in sorted(f for f in directory.rglob("*") if f.is_file()):
        with file.open("rb") as f:
            os.fsync(f.fileno())
        name = file.relative_to(directory).as_posix()
        files[name] = {"bytes": file.stat().st_size, "sha256": sha256(file)}
    manifest = directory / MANIFEST
    manifest.write_text(json.dumps({"format": FORMAT, "files": files}, indent=1))
    with manifest.open("rb") as f:
        os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(directory: Path, keep_last: int, keep_best: bool = False) -> None:
    done = completed_checkpoints(directory)
    keep = set(done[-keep_last:]) if keep_last > 0 else set(done)
    best = best_checkpoint(directory) if keep_best else None
    for old in done:
        if old not in keep and old != best:
            shutil.rmtree(old)
