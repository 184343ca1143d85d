"""`lmforge` under torchrun, except that rank 1 dies by SIGKILL while writing its shard of the
checkpoint of one step, as a process killed by the OOM killer or a failing node would.

    python -m torch.distributed.run --nproc-per-node 2 tests/train/kill_rank_mid_save.py \
        STEP PID_DIR pretrain [section.key=value ...]

Each rank first writes its pid to PID_DIR/rank<N>, so the test can check that none outlives
torchrun. The product code is unchanged: `dcp.save`, which checkpoint.py looks up at call time,
is wrapped to hand DCP's own file writer a file system whose shard file kills the process
once KILL_AFTER_BYTES of it are on disk: the shard is left partly written, tensor data
included, and no rank has written `.metadata` or the manifest, or renamed the temporary
directory.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter

from lmforge.cli import main

KILLED_RANK = 1
KILL_AFTER_BYTES = 1 << 16
"""Well inside a rank's shard of the tests' tiny model and its optimizer state (~1 MB)."""


class DyingShard(io.FileIO):
    """An unbuffered shard file: the write that takes it past KILL_AFTER_BYTES lands on disk,
    then the process is killed."""

    def write(self, data: Any) -> int:
        written = super().write(data) or 0
        if self.tell() >= KILL_AFTER_BYTES:
            os.fsync(self.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return written


class DyingFileSystem(FileSystem):
    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[io.IOBase]:
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with DyingShard(path, "w") as stream:
            yield stream


def dying_save(save: Callable[..., Any], step: int) -> Callable[..., Any]:
    """`save`, with the shard of the checkpoint of `step` written through DyingFileSystem."""
    tmp_name = f".tmp-step_{step:08d}"  # checkpoint.py writes step_X under this name first

    def wrapper(state_dict: Any, *, checkpoint_id: Any = None, **kwargs: Any) -> Any:
        if checkpoint_id is not None and Path(checkpoint_id).parent.name == tmp_name:
            writer = FileSystemWriter(checkpoint_id)
            writer.fs = DyingFileSystem()
            kwargs["storage_writer"] = writer
        return save(state_dict, checkpoint_id=checkpoint_id, **kwargs)

    return wrapper


if __name__ == "__main__":
    step, pid_dir, argv = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    rank = int(os.environ["RANK"])
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"rank{rank}").write_text(str(os.getpid()))
    if rank == KILLED_RANK:
        dcp.save = dying_save(dcp.save, step)
    sys.exit(main(argv))
