"""torchrun on CPU (gloo): 2-process FSDP2 and DDP train the same model as 1 process, a run
saved at one world size resumes at another, and a rank killed mid-save costs only the steps
since the last checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from lmforge import pipeline
from lmforge.checkpoint import load_newest_good
from lmforge.checkpoint_dirs import (
    MANIFEST,
    checkpoint_dir,
    completed_checkpoints,
    latest_checkpoint,
)
from lmforge.logs import read_metrics
from lmforge.model.llama import Llama
from lmforge.recipe import load_recipe
from lmforge.train.optim import build_optimizer
from tests.conftest import TINY_OVERRIDES
from tests.train.kill_rank_mid_save import KILL_AFTER_BYTES

pytestmark = pytest.mark.multiproc

ARGS = [*TINY_OVERRIDES, "train.precision=fp32", "train.max_tokens=4096"]
"""8 steps of 512 tokens: 1 micro-batch of 4 × 64 per rank at world 2, 2 at world 1."""
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
KILL_RANK_MID_SAVE = Path(__file__).with_name("kill_rank_mid_save.py")


def torchrun(run_dir: Path, *extra: str) -> None:
    cmd = [*TORCHRUN, "-m", "lmforge", "pretrain", *ARGS, f"run_dir={run_dir}", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def one_process(run_dir: Path, *extra: str, resume: bool = False) -> None:
    recipe = load_recipe(None, [*ARGS, f"run_dir={run_dir}", *extra])
    pipeline.pretrain_stage(recipe, resume=resume)


def copy(prepared_run: Path, tmp_path: Path, name: str) -> Path:
    run_dir = tmp_path / name
    shutil.copytree(prepared_run, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def reference(prepared_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-process run every other run must reproduce."""
    run_dir = copy(prepared_run, tmp_path_factory.mktemp("dist"), "one")
    one_process(run_dir)
    return run_dir


def assert_same_run(a: Path, b: Path, rtol: float = 1e-5) -> None:
    """Same per-step loss and grad norm, same final weights (up to reduction order)."""
    ma, mb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == list(range(1, 9))
    for ra, rb in zip(ma, mb, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=rtol)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=100 * rtol)
        assert ra["tokens"] == rb["tokens"]
    assert ma[-1]["tokens_by_source"] == mb[-1]["tokens_by_source"]
    wa = load_file(a / "checkpoints" / "step_00000008" / "model.safetensors")
    wb = load_file(b / "checkpoints" / "step_00000008" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 100 * rtol, k


@pytest.mark.parametrize(("strategy", "checkpointing"), [("fsdp", "full"), ("ddp", "none")])
def test_two_processes_train_the_same_model_as_one(
    reference: Path, prepared_run: Path, tmp_path: Path, strategy: str, checkpointing: str
) -> None:
    run_dir = copy(prepared_run, tmp_path, strategy)
    torchrun(
        run_dir,
        f"parallel.strategy={strategy}",
        f"parallel.activation_checkpointing={checkpointing}",
    )
    assert_same_run(reference, run_dir)
    shards = sorted(p.name for p in (run_dir / "checkpoints/step_00000008/state").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one shard file a rank


def test_a_run_saved_at_world_2_resumes_at_world_1_and_back(
    reference: Path, prepared_run: Path, tmp_path: Path
) -> None:
    down = copy(prepared_run, tmp_path, "down")
    # FSDP, written in the background, only the sharded state (no gathered model.safetensors)
    torchrun(down, "train.stop_at_step=4", "train.async_save=true", "train.save_consolidated=false")
    one_process(down, resume=True)
    assert_same_run(reference, down)

    up = copy(prepared_run, tmp_path, "up")
    one_process(up, "train.stop_at_step=4")
    torchrun(up, "--resume")
    assert_same_run(reference, up)


def test_bf16_fsdp_reduces_in_fp32_and_tracks_autocast(prepared_run: Path, tmp_path: Path) -> None:
    """FSDP's bf16 parameters with fp32 gradient reduction vs one process under bf16 autocast:
    different roundings of the same computation, so close but not equal."""
    one = copy(prepared_run, tmp_path, "one_bf16")
    one_process(one, "train.precision=bf16")
    two = copy(prepared_run, tmp_path, "two_bf16")
    torchrun(two, "train.precision=bf16")
    ma, mb = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    for ra, rb in zip(ma, mb, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=0.02)
    weights = load_file(two / "checkpoints" / "step_00000008" / "model.safetensors")
    assert {str(w.dtype) for w in weights.values()} == {"torch.float32"}  # fp32 master weights
    assert json.loads((two / "checkpoints/step_00000008/trainer.json").read_text())["step"] == 8


def test_a_rank_killed_mid_save_leaves_the_last_good_checkpoint(
    reference: Path, prepared_run: Path, tmp_path: Path
) -> None:
    """SIGKILL of rank 1 while it writes its shard of step 8: torchrun fails and stops rank 0,
    step 4 stays the newest checkpoint, the partly written one is never taken for one, and
    --resume redoes steps 5-8 exactly."""
    run_dir = copy(prepared_run, tmp_path, "killed")
    every_4 = "train.save_every_steps=4"
    pids = tmp_path / "pids"
    cmd = [*TORCHRUN, str(KILL_RANK_MID_SAVE), "8", str(pids), "pretrain"]
    done = run_reaping_workers([*cmd, *ARGS, f"run_dir={run_dir}", every_4], pids)
    assert done.returncode != 0, done.stderr[-3000:]
    killed = int((pids / "rank1").read_text())
    assert f"Signal 9 (SIGKILL) received by PID {killed}" in done.stderr, done.stderr[-3000:]

    ckpts = checkpoint_dir(run_dir)
    step_4, tmp = ckpts / "step_00000004", ckpts / ".tmp-step_00000008"
    shard = tmp / "state" / "__1_0.distcp"  # rank 1 died writing it: shorter than a whole one
    whole = (step_4 / "state" / "__1_0.distcp").stat().st_size
    assert KILL_AFTER_BYTES <= shard.stat().st_size < whole
    assert not (tmp / "state" / ".metadata").exists() and not (tmp / MANIFEST).exists()
    assert completed_checkpoints(ckpts) == [step_4] and latest_checkpoint(ckpts) == step_4
    recipe = load_recipe(None, [*ARGS, f"run_dir={run_dir}"])
    model = Llama(recipe.model)
    path, state = load_newest_good(ckpts, model, build_optimizer(model, recipe.optim))
    assert (path, state.step, state.tokens) == (step_4, 4, 4 * 512)

    one_process(run_dir, every_4, resume=True)  # a torchrun restart would take 10 s more
    assert_same_run(reference, run_dir)
    assert not tmp.exists()  # replaced by the new save of step 8, then renamed into place


def run_reaping_workers(cmd: list[str], pid_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run torchrun; then SIGKILL any worker that outlived it (each runs in a session of its
    own, so ending torchrun does not end them), and fail if there was one."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        survivors = [pid for pid in _worker_pids(pid_dir) if _alive(pid)]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        assert not survivors, f"workers outlived torchrun (now killed): {survivors}"


def _worker_pids(pid_dir: Path) -> list[int]:
    return [int(p.read_text()) for p in pid_dir.glob("rank*")]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
