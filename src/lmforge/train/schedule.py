"""Learning rate as a pure function of tokens seen: linear warmup → cosine → linear cooldown.

Token-based, not step-based, so changing the batch size or world size keeps the curve (XGen warms
up over 375M tokens; ChuXin ends with a cooldown phase after the cosine decay).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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


def lr_at(tokens: int, total_tokens: int, peak_lr: float, cfg: ScheduleConfig) -> float:
    """The learning rate in force after `tokens` of `total_tokens` have been trained."""
    cooldown_start = max(total_tokens - cfg.cooldown_tokens, cfg.warmup_tokens)
    if tokens < cfg.warmup_tokens:
        return peak_lr * tokens / cfg.warmup_tokens
    floor = peak_lr * cfg.cosine_min_ratio
    if tokens < cooldown_start:
        progress = (tokens - cfg.warmup_tokens) / (cooldown_start - cfg.warmup_tokens)
        return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    span = max(total_tokens - cooldown_start, 1)
    progress = min((tokens - cooldown_start) / span, 1.0)
    return floor + (peak_lr * cfg.final_lr_ratio - floor) * progress
