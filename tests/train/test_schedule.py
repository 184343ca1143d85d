"""The learning-rate curve: warmup, cosine, cooldown, all as a function of tokens."""

from __future__ import annotations

import pytest

from lmforge.train.schedule import ScheduleConfig
from lmforge.train.stages import RunDefaults, resolve_stages, stage_at

CFG = ScheduleConfig(
    warmup_tokens=100, cooldown_tokens=200, cosine_min_ratio=0.1, final_lr_ratio=0.0
)


def lr_at(tokens: int, total: int, peak: float, cfg: ScheduleConfig, batch: int = 10) -> float:
    """The lr of a recipe without stages: its schedule as the pretrain + cooldown stages."""
    run = RunDefaults(total, batch, 1, 10, 10_000.0, 8, peak, cfg)
    return stage_at(resolve_stages((), run), tokens).lr_at(tokens)


def test_warmup_cosine_cooldown_shape() -> None:
    total, peak = 1000, 1.0
    assert lr_at(0, total, peak, CFG) == 0.0
    assert lr_at(50, total, peak, CFG) == pytest.approx(0.5)
    assert lr_at(100, total, peak, CFG) == pytest.approx(1.0)
    assert lr_at(450, total, peak, CFG) == pytest.approx(0.55)  # cosine midpoint of [1, 0.1]
    assert lr_at(800, total, peak, CFG) == pytest.approx(0.1)  # cooldown starts at the floor
    assert lr_at(900, total, peak, CFG) == pytest.approx(0.05)
    assert lr_at(1000, total, peak, CFG) == pytest.approx(0.0)
    curve = [lr_at(t, total, peak, CFG) for t in range(100, 1001, 10)]
    assert all(
        a >= b for a, b in zip(curve[:-1], curve[1:], strict=True)
    )  # never rises after warmup


def test_budget_shorter_than_warmup_plus_cooldown() -> None:
    values = [lr_at(t, 150, 1.0, CFG) for t in range(0, 151, 5)]
    assert max(values) <= 1.0 and values[-1] == pytest.approx(0.0)


def test_cooldown_boundary_rounds_to_whole_steps() -> None:
    stages = resolve_stages((), RunDefaults(1000, 300, 1, 10, 1e4, 8, 1.0, CFG))
    assert [(s.name, s.start, s.steps) for s in stages] == [
        ("pretrain", 0, 3),
        ("cooldown", 900, 1),
    ]
