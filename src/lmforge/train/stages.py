"""Training stages: the sequence length, batch, RoPE base, data mixture and learning-rate segment
in force at a token count.

XGen trains 800B tokens at 2K, then 400B at 4K, then 300B at 8K; ChuXin pretrains at 4K, cools
the learning rate down, then extends the context step by step to 1M, raising the RoPE base each
time (Adjusted Base Frequency). A recipe lists such stages; `resolve_stages` fills in what each
leaves out and fixes where each starts, and `stage_at` is the pure function the trainer asks at
every step. A recipe without stages is one warmup → cosine stage plus the cooldown of its
`schedule` section.

A stage runs whole optimizer steps: its budget is rounded up to a multiple of its batch, and the
next stage starts where it really ended, so a boundary never falls inside a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from lmforge.train.schedule import LRShape, ScheduleConfig, segment_lr


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    name: str
    tokens: int
    """Budget in tokens, rounded up to whole steps."""
    seq_len: int | None = None
    """Packed row length; None: the previous stage's (the first: packing.seq_len)."""
    batch_tokens: int | None = None
    """Global tokens per step; None: the previous stage's (the first: train.batch_tokens)."""
    micro_batch_size: int | None = None
    """Rows per forward on each rank; None: as many as keep train.micro_batch_size rows of
    packing.seq_len tokens (at least 1), so a longer row does not grow the activations."""
    rope_theta: float | None = None
    """RoPE base from this stage on (ABF context extension raises it); None: see
    rope_theta_rule."""
    rope_theta_rule: Literal["keep", "ntk"] = "keep"
    """With rope_theta None: "keep" the previous stage's base, or "ntk": scale it by
    (seq_len / previous seq_len)^(d/(d-2)), d = head_dim, so the lowest frequency stretches
    over the new length as it did over the previous stage's (chained ntk stages compose; the
    first stage's previous is the model's rope_theta at packing.seq_len)."""
    mixture: dict[str, float] = field(default_factory=dict)
    """Source weights from this stage on (a source left out keeps the weight an earlier stage,
    or else data.sources, gave it); empty: unchanged. The switch happens when the document
    stream reaches the stage's start, which runs ahead of the trained tokens by less than one
    document."""
    lr_schedule: LRShape = "cosine"
    """constant at lr, or cosine / linear from lr to end_lr over the stage (after warmup)."""
    lr: float | None = None
    """Start (peak) learning rate; None: where the previous stage ended (the first: optim.lr)."""
    end_lr: float = 0.0
    """Where a cosine or linear stage ends."""
    warmup_tokens: int = 0
    """Linear warmup from 0 to lr at the start of the stage."""

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise ValueError(f"stage {self.name!r}: tokens must be > 0, got {self.tokens}")
        for key in ("seq_len", "batch_tokens", "micro_batch_size", "rope_theta"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"stage {self.name!r}: {key} must be > 0, got {value}")


@dataclass(frozen=True)
class Stage:
    """A stage with every value resolved and its place on the token axis fixed."""

    index: int
    name: str
    start: int
    """Tokens trained before it."""
    steps: int
    batch_tokens: int
    seq_len: int
    micro_batch_size: int
    rope_theta: float
    mixture: dict[str, float]
    lr_schedule: LRShape
    lr: float
    end_lr: float
    warmup_tokens: int

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_tokens

    @property
    def end(self) -> int:
        return self.start + self.tokens

    def lr_at(self, tokens: int) -> float:
        """The learning rate for the step that starts after `tokens` tokens of the run."""
        into = tokens - self.start
        return segment_lr(
            self.lr_schedule, self.lr, self.end_lr, self.warmup_tokens, into, self.tokens
        )


@dataclass(frozen=True)
class RunDefaults:
    """What stages inherit from the rest of the recipe."""

    max_tokens: int
    batch_tokens: int
    micro_batch_size: int
    seq_len: int
    rope_theta: float
    head_dim: int
    lr: float
    schedule: ScheduleConfig


def resolve_stages(stages: tuple[StageConfig, ...], run: RunDefaults) -> tuple[Stage, ...]:
    """Stages with nothing left to inherit; none given: pretrain (warmup → cosine) + cooldown."""
    if not stages:
        stages = legacy_stages(run)
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stages: names must be unique, got {names}")
    resolved: list[Stage] = []
    start, seq_len, batch, theta, lr = 0, run.seq_len, run.batch_tokens, run.rope_theta, run.lr
    row_tokens = run.micro_batch_size * run.seq_len
    for i, cfg in enumerate(stages):
        previous_len, seq_len = seq_len, cfg.seq_len or seq_len
        batch = cfg.batch_tokens or batch
        if cfg.rope_theta is not None:
            theta = cfg.rope_theta
        elif cfg.rope_theta_rule == "ntk":
            theta = ntk_rope_theta(theta, seq_len / previous_len, run.head_dim)
        start_lr = cfg.lr if cfg.lr is not None else lr
        stage = Stage(
            index=i,
            name=cfg.name,
            start=start,
            steps=math.ceil(cfg.tokens / batch),
            batch_tokens=batch,
            seq_len=seq_len,
            micro_batch_size=cfg.micro_batch_size or max(1, row_tokens // seq_len),
            rope_theta=theta,
            mixture=dict(cfg.mixture),
            lr_schedule=cfg.lr_schedule,
            lr=start_lr,
            end_lr=start_lr if cfg.lr_schedule == "constant" else cfg.end_lr,
            warmup_tokens=cfg.warmup_tokens,
        )
        resolved.append(stage)
        start, lr = stage.end, stage.end_lr
    return tuple(resolved)


def legacy_stages(run: RunDefaults) -> tuple[StageConfig, ...]:
    """`schedule` over `max_tokens` as stages: warmup → cosine to the floor, then the linear
    cooldown from the floor to the final lr over the last cooldown_tokens."""
    s = run.schedule
    cooldown_start = max(run.max_tokens - s.cooldown_tokens, min(s.warmup_tokens, run.max_tokens))
    floor = run.lr * s.cosine_min_ratio
    first = StageConfig(
        name="pretrain",
        tokens=max(cooldown_start, 1),
        warmup_tokens=s.warmup_tokens,
        end_lr=floor,
    )
    pretrain_tokens = math.ceil(first.tokens / run.batch_tokens) * run.batch_tokens
    if pretrain_tokens >= run.max_tokens:
        return (first,)
    cooldown = StageConfig(
        name="cooldown",
        tokens=run.max_tokens - pretrain_tokens,
        lr_schedule="linear",
        end_lr=run.lr * s.final_lr_ratio,
    )
    return first, cooldown


def ntk_rope_theta(theta: float, scale: float, head_dim: int) -> float:
    """The "NTK-aware" RoPE base for a context `scale` times longer: theta · scale^(d/(d-2))."""
    return theta * scale ** (head_dim / (head_dim - 2))


def stage_at(stages: tuple[Stage, ...], tokens: int) -> Stage:
    """The stage in force for the step that starts after `tokens` tokens (the last one once the
    budget is spent)."""
    for stage in stages:
        if tokens < stage.end:
            return stage
    return stages[-1]


def trained_stage(stages: tuple[Stage, ...], tokens: int) -> Stage:
    """The stage of the last step taken after `tokens` tokens: the one whose RoPE base and row
    length the weights were last trained with."""
    return stage_at(stages, max(tokens - 1, 0))


def tokens_at_step(stages: tuple[Stage, ...], step: int) -> int:
    """Tokens trained after `step` steps of these stages."""
    for stage in stages:
        if step <= stage.steps:
            return stage.start + step * stage.batch_tokens
        step -= stage.steps
    return total_tokens(stages)


def total_steps(stages: tuple[Stage, ...]) -> int:
    return sum(s.steps for s in stages)


def total_tokens(stages: tuple[Stage, ...]) -> int:
    return stages[-1].end
