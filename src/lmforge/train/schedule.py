"""Learning rate as a pure function of tokens seen within one stage's segment.

Token-based, not step-based, so changing the batch size or world size keeps the curve (XGen warms
up over 375M tokens; ChuXin ends with a cooldown phase after the cosine decay). A recipe without
stages describes its curve with `ScheduleConfig` (warmup → cosine → linear cooldown over the
whole budget); stages.py turns that into two segments. A training step takes the curve's
value at the middle of its own tokens (train/loop.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lmforge.ranges import check_ranges

LRShape = Literal["constant", "cosine", "linear"]


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    warmup_tokens: int = 20_000
    """Linear warmup from 0 to the peak lr over this many tokens."""
    cooldown_tokens: int = 100_000
    """Final linear decay to final_lr_ratio · lr over the last this-many tokens."""
    cosine_min_ratio: float = 0.1
    """Cosine decays the peak to this fraction of it by the start of the cooldown."""
    final_lr_ratio: float = 0.0
    """The cooldown ends at this fraction of the peak."""

    def __post_init__(self) -> None:
        check_ranges(
            self,
            non_negative=("warmup_tokens", "cooldown_tokens"),
            fraction=("cosine_min_ratio", "final_lr_ratio"),
        )


def segment_lr(
    shape: LRShape, lr: float, end_lr: float, warmup_tokens: int, into: int, span: int
) -> float:
    """The learning rate `into` tokens into a segment of `span` tokens: linear warmup from 0 to
    `lr` over `warmup_tokens`, then constant at `lr`, or cosine / linear from `lr` to `end_lr`
    by the end of the span."""
    if into < warmup_tokens:
        return lr * into / warmup_tokens
    if shape == "constant":
        return lr
    progress = min((into - warmup_tokens) / max(span - warmup_tokens, 1), 1.0)
    if shape == "cosine":
        return end_lr + (lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr + (end_lr - lr) * progress
