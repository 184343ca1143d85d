"""Every recipe in recipes/ loads, resolves its stages and plans; each *-mini twin keeps its full
recipe's stage structure at a size 2 CPU cores run in minutes."""

from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.plan import plan_recipe
from lmforge.recipe import load_recipe
from lmforge.train.stages import Stage, total_tokens

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL = sorted(RECIPES.glob("*.yaml"))
TWINS = sorted(p.name.removesuffix("-mini.yaml") for p in RECIPES.glob("*-mini.yaml"))


def test_the_reports_recipes_and_their_twins_are_there() -> None:
    assert {"chuxin-1.6b", "xmodel-lm-1.1b", "xgen-7b"} <= set(TWINS)


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_recipe_loads_resolves_and_plans(path: Path) -> None:
    recipe = load_recipe(path)
    stages = recipe.resolved_stages()
    assert stages and total_tokens(stages) > 0
    plan = plan_recipe(recipe, gpus=8)
    assert [s.name for s in plan.stages] == [s.name for s in stages]
    json.dumps(plan.to_dict())
    shares = recipe.tokenizer.source_shares  # train-tokenizer needs one for every source
    assert not shares or set(shares) == {s.name for s in recipe.data.sources}


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_plan_verb_prints_every_stage(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(path), "--gpus", "64", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    for stage in load_recipe(path).resolved_stages():
        assert f"| {stage.name} |" in out
    assert "memory per GPU" in out and "total:" in out
    assert main(["plan", str(path), "--gpus", "16", "--json", "--activation-checkpointing"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpus"] == 16 and data["checkpointing"] == "full"


def test_plan_verb_rejects_bad_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(RECIPES / "xgen-7b.yaml"), "--mfu", "2"]) == 2
    assert "--mfu" in capsys.readouterr().err


def shape(stages: tuple[Stage, ...]) -> list[tuple[str, bool, bool, bool]]:
    """Each stage's kind: lr curve, whether the row grows, the RoPE base grows, the mixture
    switches; runs of equal kinds count once (the full ChuXin extends in 5 steps, its twin 2)."""
    kinds = [
        (s.lr_schedule, s.seq_len > prev.seq_len, s.rope_theta > prev.rope_theta, bool(s.mixture))
        for prev, s in zip((stages[0], *stages), stages, strict=False)
    ]
    return [k for k, _ in groupby(kinds)]


@pytest.mark.parametrize("name", TWINS)
def test_mini_twin_keeps_the_stage_structure_at_cpu_size(name: str) -> None:
    if not load_recipe(RECIPES / f"{name}.yaml").stages:
        pytest.skip("no stages: an sft recipe, whose steps come from its chat data")
    full = load_recipe(RECIPES / f"{name}.yaml").resolved_stages()
    mini = load_recipe(RECIPES / f"{name}-mini.yaml").resolved_stages()
    assert shape(mini) == shape(full)
    assert total_tokens(mini) <= 600_000  # a few minutes at the demo's ~3K tokens/s
    assert max(s.seq_len for s in mini) <= 1024
