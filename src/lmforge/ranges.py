"""Range checks for config dataclasses: a value out of range is a ValueError naming its key
(recipe loading adds the file and section), raised at load, not at the step that divides by it."""

from __future__ import annotations

from collections.abc import Iterable


def check_ranges(
    cfg: object,
    positive: Iterable[str] = (),
    non_negative: Iterable[str] = (),
    fraction: Iterable[str] = (),
) -> None:
    """positive: > 0; non_negative: >= 0; fraction: in [0, 1]. None passes (an unset option);
    NaN fails every check."""
    rules = [
        *((name, "> 0", lambda v: v > 0) for name in positive),
        *((name, ">= 0", lambda v: v >= 0) for name in non_negative),
        *((name, "in [0, 1]", lambda v: 0 <= v <= 1) for name in fraction),
    ]
    for name, rule, holds in rules:
        value = getattr(cfg, name)
        if value is None:
            continue
        if not holds(value):  # NaN compares false
            raise ValueError(f"{name} must be {rule}, got {value}")
