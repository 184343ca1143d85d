"""Loss-spike guard: keep one bad batch from wrecking a run (XGen names loss spikes as the risk
its recipe was designed around).

Before each optimizer step the guard sees the step's loss and gradient norm (both global across
ranks, so every rank decides alike). A non-finite value is always an event; a finite one is a
spike when its z-score against the last `window` accepted steps exceeds the threshold. The loop
then applies the recipe's action: skip the update, skip it and the next batches, or rewind to the
last checkpoint and skip the data in between (optionally lowering the learning rate).

A spike is transient. When `patience` steps in a row are spikes although their updates were
dropped (the weights did not move), the data has shifted (a new source or stage, harder text):
the step is taken, and the baseline restarts from it, instead of skipping until the run dies.
Events go to `events.jsonl` and the log; the guard's history is saved with every checkpoint so a
resumed run judges exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.ranges import check_ranges

GuardAction = Literal["skip_update", "skip_batches", "rewind"]

MIN_RELATIVE_STD = 0.01
"""A z-score's spread is at least this fraction of the mean, so a flat history does not turn
noise into spikes."""


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    enabled: bool = True
    window: int = 32
    """Accepted steps whose loss and grad norm make the baseline."""
    min_history: int = 8
    """Steps in the window before spikes are judged (non-finite values always are)."""
    loss_z: float = 6.0
    """A loss this many standard deviations above the window's mean is a spike; 0: off."""
    grad_norm_z: float = 0.0
    """The same for the gradient norm (before clipping); 0: off, the default: with small
    batches it is heavy-tailed (the demo's 2K-token steps: 7 "spikes" at z > 6 in 293 steps,
    none followed by a loss spike), so it would drop good updates. Non-finite norms are always
    caught."""
    action: GuardAction = "skip_update"
    """skip_update: drop the step's update; skip_batches: also drop the next `skip_next` steps'
    batches unseen; rewind: reload the last checkpoint and go on after the offending batch."""
    skip_next: int = 1
    """Steps' worth of batches skip_batches drops after the offending one."""
    rewind_lr_factor: float = 1.0
    """Multiply the learning rate by this after each rewind (e.g. 0.5)."""
    patience: int = 4
    """Finite spikes in a row after which the level is taken as the new normal (0: never)."""
    max_events: int = 20
    """Stop the run with an error after this many events: something worse than spikes."""

    def __post_init__(self) -> None:
        check_ranges(
            self,
            positive=("rewind_lr_factor", "max_events"),
            non_negative=("loss_z", "grad_norm_z", "skip_next", "patience"),
        )
        if self.window < 2 or not 0 < self.min_history <= self.window:
            raise ValueError(
                f"guard: need window >= 2 and 0 < min_history <= window, got "
                f"{self.window} and {self.min_history}"
            )


class GuardError(RuntimeError):
    """Too many loss-spike events: the run stops rather than skip its way through bad data."""


class SpikeGuard:
    def __init__(self, cfg: GuardConfig) -> None:
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.grad_norms: deque[float] = deque(maxlen=cfg.window)
        self.events = 0
        self.lr_scale = 1.0
        self.in_a_row = 0
        """Consecutive finite spikes so far."""

    def check(self, loss: float, grad_norm: float) -> dict[str, Any] | None:
        """None for a step to take, else what is wrong: {"kind", "z"}. Kind "level_shift" is
        taken too (and logged): `patience` spikes in a row."""
        if not self.cfg.enabled:
            return None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return {"kind": "non_finite", "z": None}
        if len(self.losses) < self.cfg.min_history:
            return None
        for kind, value, history, limit in (
            ("loss_spike", loss, self.losses, self.cfg.loss_z),
            ("grad_norm_spike", grad_norm, self.grad_norms, self.cfg.grad_norm_z),
        ):
            z = zscore(value, history)
            if limit > 0 and z > limit:
                self.in_a_row += 1
                if self.cfg.patience and self.in_a_row > self.cfg.patience:
                    return {"kind": "level_shift", "z": z, "was": kind}
                return {"kind": kind, "z": z}
        self.in_a_row = 0
        return None

    def accept(self, loss: float, grad_norm: float, level_shift: bool = False) -> None:
        """Add a taken step to the baseline; after a level shift the baseline restarts."""
        if level_shift:
            self.losses.clear()
            self.grad_norms.clear()
            self.in_a_row = 0
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)

    def record_event(self) -> None:
        self.events += 1
        if self.events > self.cfg.max_events:
            raise GuardError(
                f"loss-spike guard: {self.events} events (guard.max_events "
                f"{self.cfg.max_events}); see events.jsonl. The last checkpoint is intact"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "losses": list(self.losses),
            "grad_norms": list(self.grad_norms),
            "events": self.events,
            "lr_scale": self.lr_scale,
            "in_a_row": self.in_a_row,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = deque(state.get("losses", []), maxlen=self.cfg.window)
        self.grad_norms = deque(state.get("grad_norms", []), maxlen=self.cfg.window)
        self.events = state.get("events", 0)
        self.lr_scale = state.get("lr_scale", 1.0)
        self.in_a_row = state.get("in_a_row", 0)


def zscore(value: float, history: deque[float]) -> float:
    mean = statistics.fmean(history)
    spread = max(statistics.pstdev(history), MIN_RELATIVE_STD * abs(mean), 1e-12)
    return (value - mean) / spread
