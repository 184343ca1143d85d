"""Loss-spike guard: detection by z-score and non-finite values, and each action on a real run
with a NaN or a spike injected at one batch (keyed by its tokens, so a rewind that skips the data
never meets it again)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lmforge import pipeline
from lmforge.logs import read_metrics
from lmforge.model.llama import Llama
from lmforge.recipe import load_recipe
from lmforge.train.guard import GuardConfig, GuardError, SpikeGuard
from tests.conftest import TINY_OVERRIDES


def warmed_guard(**overrides: Any) -> SpikeGuard:
    guard = SpikeGuard(GuardConfig(window=8, min_history=4, **overrides))
    for loss, norm in [(3.0, 1.0), (2.9, 1.1), (3.1, 0.9), (2.95, 1.05), (3.05, 1.0)]:
        guard.accept(loss, norm)
    return guard


def test_spikes_are_judged_by_z_score_and_non_finite_always() -> None:
    guard = warmed_guard(grad_norm_z=6.0)
    assert guard.check(3.2, 1.2) is None
    assert guard.check(2.0, 0.5) is None  # only upward jumps are spikes
    assert guard.check(9.0, 1.0)["kind"] == "loss_spike"  # type: ignore[index]
    assert guard.check(3.0, 9.0)["kind"] == "grad_norm_spike"  # type: ignore[index]
    assert warmed_guard().check(3.0, 9.0) is None  # grad-norm spikes are off by default
    fresh = SpikeGuard(GuardConfig(window=8, min_history=4))
    assert fresh.check(50.0, 50.0) is None  # no baseline yet
    assert fresh.check(math.nan, 1.0)["kind"] == "non_finite"  # type: ignore[index]
    assert fresh.check(1.0, math.inf)["kind"] == "non_finite"  # type: ignore[index]


def test_a_loss_that_stays_up_is_a_level_shift_not_a_spike() -> None:
    guard = warmed_guard(patience=3)
    kinds = [guard.check(9.0, 1.0)["kind"] for _ in range(4)]  # type: ignore[index]
    assert kinds == ["loss_spike"] * 3 + ["level_shift"]  # the 4th in a row is the new normal
    guard.accept(9.0, 1.0, level_shift=True)
    assert list(guard.losses) == [9.0] and guard.check(9.1, 1.0) is None  # a fresh baseline
    again = warmed_guard(patience=3)
    again.check(9.0, 1.0)
    assert again.check(3.0, 1.0) is None and again.in_a_row == 0  # a healthy step resets


def test_state_round_trips_and_events_are_bounded() -> None:
    guard = warmed_guard(max_events=1)
    guard.lr_scale = 0.5
    again = SpikeGuard(guard.cfg)
    again.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert again.state_dict() == guard.state_dict()
    assert again.check(9.0, 1.0) == guard.check(9.0, 1.0)
    guard.record_event()
    with pytest.raises(GuardError, match="2 events"):
        guard.record_event()


GUARDED = [
    *TINY_OVERRIDES,
    "train.precision=fp32",
    "guard.window=8",
    "guard.min_history=3",
    "guard.loss_z=20",
    "guard.grad_norm_z=0",
]
"""16 steps of 2 micro-batches; only the injected ×10⁴ loss counts as a spike."""
POISONED_STEP = 6


class Tap:
    """Records the token ids of every training micro-batch; turns the loss of `poison` into a
    spike or NaN."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, poison: torch.Tensor | None, how: str):
        self.seen: list[torch.Tensor] = []
        original = Llama.forward

        def forward(model: Llama, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            out = original(model, input_ids, *args, **kwargs)
            if not model.training:
                return out
            self.seen.append(input_ids.clone())
            if how == "shift" and len(self.seen) > 2 * (POISONED_STEP - 1):
                return out * 5  # from the poisoned step on, every batch is harder
            if poison is not None and torch.equal(input_ids, poison):
                return out * (1e4 if how == "spike" else math.nan)
            return out

        monkeypatch.setattr(Llama, "forward", forward)

    def index(self, batch: torch.Tensor) -> list[int]:
        return [i for i, seen in enumerate(self.seen) if torch.equal(seen, batch)]


def run(run_dir: Path, *extra: str) -> list[dict[str, Any]]:
    recipe = load_recipe(None, [*GUARDED, f"run_dir={run_dir}", *extra])
    pipeline.pretrain_stage(recipe)
    return read_metrics(run_dir / "metrics.jsonl")


@pytest.fixture(scope="module")
def clean(
    prepared_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[dict[str, Any]], list[torch.Tensor]]]:
    """The unguarded-looking run: its metrics and the micro-batches of each step, in order."""
    run_dir = tmp_path_factory.mktemp("guard") / "clean"
    shutil.copytree(prepared_run, run_dir)
    with pytest.MonkeyPatch.context() as mp:
        tap = Tap(mp, None, "")
        metrics = run(run_dir)
    assert not (run_dir / "events.jsonl").exists()  # no false alarm on a healthy run
    yield metrics, tap.seen


def micro(seen: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    return seen[2 * (step - 1) : 2 * step]


def events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_nan_skips_the_update(
    clean: Any, prepared_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, seen = clean
    run_dir = tmp_path / "nan"
    shutil.copytree(prepared_run, run_dir)
    Tap(monkeypatch, micro(seen, POISONED_STEP)[1], "nan")
    metrics = run(run_dir, "train.save_every_steps=1", "train.keep_last=20")
    (event,) = events(run_dir)
    assert event["kind"] == "non_finite" and event["step"] == POISONED_STEP
    assert event["action"] == "skip_update" and event["rows"] == [40, 48]  # 8 rows a step
    assert metrics[POISONED_STEP - 1]["guard"] == "non_finite"
    before = load_file(run_dir / "checkpoints/step_00000005/model.safetensors")
    after = load_file(run_dir / "checkpoints/step_00000006/model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the update was dropped
    final = load_file(run_dir / "checkpoints/step_00000016/model.safetensors")
    assert all(torch.isfinite(w).all() for w in final.values())


def test_spike_skips_the_batch_and_the_next(
    clean: Any, prepared_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, seen = clean
    run_dir = tmp_path / "skip"
    shutil.copytree(prepared_run, run_dir)
    tap = Tap(monkeypatch, micro(seen, POISONED_STEP)[0], "spike")
    metrics = run(run_dir, "guard.action=skip_batches", "guard.skip_next=1")
    (event,) = events(run_dir)
    assert event["kind"] == "loss_spike" and event["z"] > 20
    assert event["rows"] == [40, 56]  # the offending step's rows and the next step's
    assert [r["step"] for r in metrics] == list(range(1, 17))
    for batch in micro(seen, POISONED_STEP + 1):
        assert tap.index(batch) == []  # never trained on
    # the step after the spike trains what the clean run trained one step later
    assert tap.index(micro(seen, POISONED_STEP + 2)[0]) == [2 * POISONED_STEP]


def test_rewind_reloads_the_checkpoint_skips_the_window_and_lowers_lr(
    clean: Any, prepared_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean_metrics, seen = clean
    run_dir = tmp_path / "rewind"
    shutil.copytree(prepared_run, run_dir)
    tap = Tap(monkeypatch, micro(seen, POISONED_STEP)[0], "spike")
    metrics = run(
        run_dir,
        "train.save_every_steps=4",
        "guard.action=rewind",
        "guard.rewind_lr_factor=0.5",
    )
    (event,) = events(run_dir)
    assert event["kind"] == "loss_spike" and event["rewound_to_step"] == 4
    assert [r["step"] for r in metrics] == list(range(1, 17))  # steps 5-6 redone, once each
    keys = ("step", "loss", "lr", "grad_norm")
    assert [[r[k] for k in keys] for r in metrics[:4]] == [
        [r[k] for k in keys] for r in clean_metrics[:4]
    ]
    for ours, theirs in zip(metrics[4:], clean_metrics[4:], strict=True):
        assert ours["lr"] == pytest.approx(theirs["lr"] * 0.5)
    assert len(tap.index(micro(seen, POISONED_STEP)[0])) == 1  # met once, then skipped
    # after the rewind, step 5 trains the data that followed the offending batch
    assert tap.index(micro(seen, POISONED_STEP + 1)[0]) == [2 * POISONED_STEP]
    assert all(math.isfinite(r["loss"]) for r in metrics)


def test_a_run_stopped_before_a_spike_rewinds_as_the_uninterrupted_run(
    clean: Any, prepared_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop_at_step=5 leaves a checkpoint at step 5 that the straight run never saved; after
    --resume the spike at step 6 still rewinds to step 4, the last one of the save cadence,
    so stopping and resuming changes nothing."""
    _, seen = clean
    args = ["train.save_every_steps=4", "guard.action=rewind", "guard.rewind_lr_factor=0.5"]
    Tap(monkeypatch, micro(seen, POISONED_STEP)[0], "spike")
    straight, split = tmp_path / "straight", tmp_path / "split"
    shutil.copytree(prepared_run, straight)
    shutil.copytree(prepared_run, split)
    expected = run(straight, *args)
    run(split, *args, "train.stop_at_step=5")
    recipe = load_recipe(None, [*GUARDED, f"run_dir={split}", *args])
    pipeline.pretrain_stage(recipe, resume=True)
    assert [e["rewound_to_step"] for e in events(split)] == [4]
    keys = ("step", "tokens", "loss", "lr", "grad_norm")
    got = read_metrics(split / "metrics.jsonl")
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in expected]


def test_a_rewind_falls_back_off_the_cadence_when_the_checkpoints_on_it_are_corrupt(
    clean: Any, prepared_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 4 (the cadence) is corrupt: the spike at step 6 rewinds to step 5 (the stop's
    checkpoint) rather than ending the run, and step 4 is set aside."""
    _, seen = clean
    args = ["train.save_every_steps=4", "guard.action=rewind", "guard.rewind_lr_factor=0.5"]
    Tap(monkeypatch, micro(seen, POISONED_STEP)[0], "spike")
    run_dir = tmp_path / "fallback"
    shutil.copytree(prepared_run, run_dir)
    run(run_dir, *args, "train.stop_at_step=5")
    rng = run_dir / "checkpoints/step_00000004/rng.pt"
    rng.write_bytes(rng.read_bytes()[:-1])
    recipe = load_recipe(None, [*GUARDED, f"run_dir={run_dir}", *args])
    pipeline.pretrain_stage(recipe, resume=True)
    assert [e["rewound_to_step"] for e in events(run_dir)] == [5]
    assert (run_dir / "checkpoints/corrupt-step_00000004").is_dir()
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, 17))


def test_a_lasting_shift_is_accepted_after_patience(
    prepared_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "shift"
    shutil.copytree(prepared_run, run_dir)
    Tap(monkeypatch, None, "shift")
    metrics = run(run_dir, "guard.patience=2")
    got = [(e["step"], e["kind"], e["action"]) for e in events(run_dir)]
    assert got == [
        (POISONED_STEP, "loss_spike", "skip_update"),
        (POISONED_STEP + 1, "loss_spike", "skip_update"),
        (POISONED_STEP + 2, "level_shift", "accept"),
    ]
    assert [r["step"] for r in metrics] == list(range(1, 17))


def test_rewinding_still_counts_spikes_in_a_row_toward_a_level_shift(
    prepared_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rewind reloads the guard's state of the checkpoint; the streak of spikes since
    then must survive it, or a lasting shift is rewound until max_events stops the run."""
    run_dir = tmp_path / "shift-rewind"
    shutil.copytree(prepared_run, run_dir)
    Tap(monkeypatch, None, "shift")
    args = ["guard.patience=2", "guard.action=rewind", "train.save_every_steps=4"]
    metrics = run(run_dir, *args, "guard.max_events=6")
    got = [(e["step"], e["kind"], e["action"], e.get("rewound_to_step")) for e in events(run_dir)]
    assert got == [
        (POISONED_STEP, "loss_spike", "rewind", 4),
        (5, "loss_spike", "rewind", 4),
        (5, "level_shift", "accept", None),
    ]
    assert [r["step"] for r in metrics] == list(range(1, 17))
