"""Training stages: the pure stage function, recipe validation, and a staged run that switches
row length, RoPE base and mixture at the boundary and resumes exactly across it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge import pipeline
from lmforge.checkpoint_dirs import latest_checkpoint
from lmforge.logs import read_metrics
from lmforge.recipe import RecipeError, load_recipe
from lmforge.train.schedule import ScheduleConfig
from lmforge.train.stages import (
    RunDefaults,
    StageConfig,
    ntk_rope_theta,
    resolve_stages,
    stage_at,
    trained_stage,
)
from tests.conftest import TINY_OVERRIDES

RUN = RunDefaults(
    max_tokens=0,
    batch_tokens=100,
    micro_batch_size=8,
    seq_len=16,
    rope_theta=10_000.0,
    head_dim=8,
    lr=1.0,
    schedule=ScheduleConfig(),
)


def test_stages_inherit_and_start_where_the_previous_really_ended() -> None:
    stages = resolve_stages(
        (
            StageConfig(name="2k", tokens=250, warmup_tokens=50, end_lr=0.1),
            StageConfig(name="4k", tokens=400, seq_len=32, batch_tokens=200, rope_theta=5e5),
            StageConfig(name="cool", tokens=200, lr_schedule="linear"),
            StageConfig(name="ext", tokens=100, seq_len=64, rope_theta_rule="ntk"),
        ),
        RUN,
    )
    assert [(s.start, s.steps, s.seq_len, s.batch_tokens) for s in stages] == [
        (0, 3, 16, 100),  # 250 tokens round up to 3 steps of 100
        (300, 2, 32, 200),
        (700, 1, 32, 200),
        (900, 1, 64, 200),
    ]
    assert [s.micro_batch_size for s in stages] == [8, 4, 4, 2]  # 128 tokens per micro-batch
    assert [s.rope_theta for s in stages[:3]] == [1e4, 5e5, 5e5]
    assert stages[3].rope_theta == pytest.approx(5e5 * 2 ** (8 / 6))  # from 32 at 5e5 to 64
    assert stages[3].rope_theta == ntk_rope_theta(5e5, 2.0, 8)
    # lr: each stage starts where the previous ended unless it says otherwise
    assert [(s.lr, s.end_lr) for s in stages] == [(1.0, 0.1), (0.1, 0.0), (0.0, 0.0), (0.0, 0.0)]
    assert [stage_at(stages, t).name for t in (0, 299, 300, 699, 700, 900, 1100, 5000)] == [
        "2k", "2k", "4k", "4k", "cool", "ext", "ext", "ext",
    ]  # fmt: skip
    assert trained_stage(stages, 300).name == "2k" and trained_stage(stages, 301).name == "4k"


def test_ntk_scales_the_previous_stages_base_and_length() -> None:
    """A first stage with its own length and base is where an ntk stage scales from; chained
    ntk stages compose to one over the whole length ratio."""
    first, ext = resolve_stages(
        (
            StageConfig(name="a", tokens=100, seq_len=32, rope_theta=5e5),
            StageConfig(name="b", tokens=100, seq_len=64, rope_theta_rule="ntk"),
        ),
        RUN,
    )
    assert ext.rope_theta == pytest.approx(5e5 * 2 ** (8 / 6))
    _, mid, last = resolve_stages(
        (
            StageConfig(name="a", tokens=100),
            StageConfig(name="b", tokens=100, seq_len=32, rope_theta_rule="ntk"),
            StageConfig(name="c", tokens=100, seq_len=64, rope_theta_rule="ntk"),
        ),
        RUN,
    )
    assert mid.rope_theta == pytest.approx(ntk_rope_theta(1e4, 2.0, 8))
    assert last.rope_theta == pytest.approx(ntk_rope_theta(1e4, 4.0, 8))


def test_lr_segments_warm_up_decay_and_hold() -> None:
    cosine, cool, hold = resolve_stages(
        (
            StageConfig(name="a", tokens=1000, warmup_tokens=100, end_lr=0.1),
            StageConfig(name="b", tokens=500, lr_schedule="linear", end_lr=0.0),
            StageConfig(name="c", tokens=500, lr_schedule="constant", lr=0.02),
        ),
        RUN,
    )
    assert cosine.lr_at(50) == pytest.approx(0.5)
    assert cosine.lr_at(550) == pytest.approx(0.55)  # cosine midpoint of [1, 0.1]
    assert cool.lr_at(1000) == pytest.approx(0.1) and cool.lr_at(1250) == pytest.approx(0.05)
    assert hold.lr_at(1500) == hold.lr_at(1999) == 0.02


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ("[{name: a, tokens: 100}, {name: a, tokens: 100}]", "names must be unique"),
        ("[{name: a, tokens: 0}]", "tokens must be > 0"),
        ("[{name: a, tokens: 100, mixture: {klingon: 1}}]", "stages[0].mixture: unknown sources"),
        ("[{name: a, tokens: 100, seqlen: 9}]", "stages[0].seqlen: unknown key"),
    ],
)
def test_bad_stages_are_named(stages: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(None, [*TINY_OVERRIDES, f"stages={stages}"])


STAGED = [
    *TINY_OVERRIDES,
    "train.precision=fp32",
    "train.save_every_steps=100",
    "train.log_every_steps=1",
    "stages=[{name: short, tokens: 2048, warmup_tokens: 512, end_lr: 0.0003,"
    "  mixture: {english: 0, chinese: 0, code: 1}},"
    " {name: long, tokens: 2048, seq_len: 128, rope_theta: 40000, lr_schedule: linear,"
    "  mixture: {code: 0, chinese: 1}}]",
]
"""4 steps of code at T=64, then 4 of Chinese at T=128 with a larger RoPE base."""


def staged_run(run_dir: Path, *extra: str, resume: bool = False) -> list[dict]:
    recipe = load_recipe(None, [*STAGED, f"run_dir={run_dir}", *extra])
    return pipeline.pretrain_stage(recipe, resume=resume)


@pytest.fixture(scope="module")
def straight(prepared_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("staged") / "straight"
    shutil.copytree(prepared_run, run_dir)
    staged_run(run_dir)
    return run_dir


def test_the_boundary_switches_length_rope_base_and_mixture(straight: Path) -> None:
    records = read_metrics(straight / "metrics.jsonl")
    assert [(r["stage"], r["seq_len"], r["rope_theta"]) for r in records] == [
        *[("short", 64, 10_000.0)] * 4,
        *[("long", 128, 40_000.0)] * 4,
    ]
    assert [r["tokens"] for r in records] == [512 * i for i in range(1, 9)]
    assert records[3]["lr"] > records[4]["lr"] > records[7]["lr"] > 0  # linear cooldown
    # each step takes the schedule at the middle of its tokens: step 1 is not at lr 0
    stages = load_recipe(None, STAGED).resolved_stages()
    middles = [r["tokens"] - 256 for r in records]
    assert [r["lr"] for r in records] == [stage_at(stages, t).lr_at(t) for t in middles]
    assert records[0]["lr"] == pytest.approx(stages[0].lr * 256 / 512)  # half way into warmup
    # the mixture switches when the stream reaches the boundary (after the document in hand)
    assert records[3]["tokens_by_source"] == {"english": 0, "chinese": 0, "code": 2048}
    last = records[-1]["tokens_by_source"]
    assert last["english"] == 0 and last["chinese"] > 0 and last["chinese"] + last["code"] == 4096
    # the checkpoint describes the model as trained last: eval/export use the new base
    model, trained = pipeline.load_trained(latest_checkpoint(straight / "checkpoints"))  # type: ignore[arg-type]
    assert model.cfg.rope_theta == 40_000.0 and trained.packing.seq_len == 128


@pytest.mark.parametrize("stop", [3, 4, 5])  # just before, at and just after the boundary
def test_resume_across_the_boundary_is_exact(
    straight: Path, prepared_run: Path, tmp_path: Path, stop: int
) -> None:
    run_dir = tmp_path / "split"
    shutil.copytree(prepared_run, run_dir)
    staged_run(run_dir, f"train.stop_at_step={stop}")
    staged_run(run_dir, resume=True)
    keys = ("step", "tokens", "loss", "lr", "grad_norm", "seq_len", "rope_theta")
    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(run_dir / "metrics.jsonl")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    wa = load_file(latest_checkpoint(straight / "checkpoints") / "model.safetensors")  # type: ignore[operator]
    wb = load_file(latest_checkpoint(run_dir / "checkpoints") / "model.safetensors")  # type: ignore[operator]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_continual_pretraining_starts_from_our_checkpoint_or_an_hf_folder(
    straight: Path, prepared_run: Path, tmp_path: Path
) -> None:
    source = latest_checkpoint(straight / "checkpoints")
    assert source is not None
    hf = pipeline.export_stage(
        load_recipe(None, [*STAGED, f"run_dir={straight}"]), out=tmp_path / "export"
    )
    continual = [
        "optim.lr=0",  # no update: the weights that come out are the ones that went in
        "stages=[{name: extend, tokens: 1024, seq_len: 128, rope_theta: 160000}]",
    ]
    firsts = []
    for name, start in (("ours", source), ("hf", hf)):
        run_dir = tmp_path / name
        shutil.copytree(prepared_run, run_dir)
        records = staged_run(run_dir, *continual, f"train.init_from={start}")
        firsts.append(records[0]["loss"])
        assert records[0]["rope_theta"] == 160_000.0
        out = load_file(latest_checkpoint(run_dir / "checkpoints") / "model.safetensors")  # type: ignore[operator]
        original = load_file(source / "model.safetensors")
        assert all(torch.equal(out[k], original[k]) for k in original)
    assert firsts[0] == firsts[1]
    with pytest.raises(RecipeError, match="train.init_from: .* neither a checkpoint"):
        shutil.copytree(prepared_run, tmp_path / "bad")
        staged_run(tmp_path / "bad", f"train.init_from={tmp_path}")
