"""`lmforge plan`: what a recipe's stages cost on N GPUs, before anything runs.

Per stage: tokens, optimizer steps, sequences per step, the micro-batch and gradient accumulation
each rank runs, training FLOPs, memory per GPU and wall time at an assumed MFU. Pure arithmetic on
the resolved recipe (no model is built, no device is touched), so a 7B plan costs milliseconds.

Memory is an estimate of what the trainer holds at its peak (the backward of the first block):
FSDP-sharded fp32 state + bf16 parameters gathered for compute + saved activations of one
micro-batch + one cross-entropy chunk's logits. Not counted: the CUDA context, NCCL buffers and
allocator fragmentation (typically a few GB), so "fits" means the estimate is below the card's
memory, not a guarantee.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.model.config import ModelConfig
from lmforge.recipe import Recipe
from lmforge.train.config import auto_loss_chunk, grad_accum_steps
from lmforge.train.stages import Stage

Checkpointing = Literal["none", "full", "every"]


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float
    """Peak dense bf16 tensor-core FLOP/s (no 2:4 sparsity)."""
    memory_gb: float
    """Device memory in decimal GB, as the datasheet states it."""


# Peak dense bf16 FLOP/s and memory per GPU, from NVIDIA's datasheets (the datasheets' headline
# bf16 numbers for Hopper are with 2:4 sparsity; dense is half): A100 SXM 312 TFLOP/s, 40 or 80 GB
# (A100 Tensor Core GPU datasheet); H100 SXM 989 TFLOP/s, 80 GB and H100 PCIe 756 TFLOP/s, 80 GB
# (H100 datasheet); H800 SXM is the H100 SXM's compute with less NVLink bandwidth, 80 GB; H200 SXM
# 989 TFLOP/s, 141 GB (H200 datasheet).
GPUS: dict[str, GPU] = {
    "a100": GPU("A100 SXM 80GB", 312e12, 80),
    "a100-40gb": GPU("A100 SXM 40GB", 312e12, 40),
    "h100": GPU("H100 SXM", 989e12, 80),
    "h100-pcie": GPU("H100 PCIe", 756e12, 80),
    "h800": GPU("H800 SXM", 989e12, 80),
    "h200": GPU("H200 SXM", 989e12, 141),
}

BF16 = 2
STATE_BYTES_PER_PARAM = 16
"""fp32 master weight (4) + fp32 gradient (4) + AdamW exp_avg and exp_avg_sq (4 + 4)."""
LOGIT_BYTES = 10
"""Per logit of the live cross-entropy chunk: bf16 logits (2), their fp32 upcast (4) and the
fp32 softmax / gradient (4)."""


AUTOCAST_EXTRA_PER_LAYER = 10
"""Per token and block, ·d bytes more under autocast with fp32 weights (one process, DDP) than
with bf16 weights (FSDP's param_dtype): both RMSNorm inputs stay fp32 (2·2d), and q/k/v and
gate/up each save their own bf16 cast of the normed input (2·2d + 2d), measured below."""


def activation_bytes_per_token_layer(cfg: ModelConfig, autocast: bool = False) -> int:
    """Bytes one block saves for its backward per token, bf16 compute without checkpointing:
    (12·d + 4·kv + 4·f + 4·H + 8), d = d_model, kv = num_kv_heads·head_dim, f = d_ff,
    H = num_heads; with `autocast` (fp32 weights, bf16 matmuls) 10·d more.

    Counted tensor by tensor (bf16 = 2 bytes unless noted):
      each of the two RMSNorms: its input (2d) and fp32 1/rms (4) → 4d + 8 (model/fused.py
      recomputes the normalised tensor); the q/k/v projections' input (2d); the attention
      kernel's q (2d), k and v (2·2kv), output (2d) and fp32 log-sum-exp per head (4H), with
      a fused (flash / efficient / flex) kernel, so no T×T score matrix is stored; that output
      is token-major, so o_proj's input is a view of it, not a copy (CPU's split kernel for
      packed rows copies it: 2d more there); the gate/up projections' input (2d); SwiGLU's
      gate and up (2·2f; their product is recomputed for down_proj's gradient).
    Cf. Korthikanti et al. 2022 (arXiv:2205.05198) §4, who count 34·h per token for a GPT layer
    with a 4h MLP, dropout and no fused attention.
    """
    d, f = cfg.d_model, cfg.d_ff
    kv = cfg.num_kv_heads * cfg.head_dim
    extra = AUTOCAST_EXTRA_PER_LAYER * d if autocast else 0
    return 12 * d + 4 * kv + 4 * f + 4 * cfg.num_heads + 8 + extra


def checkpointed_bytes_per_token_layer(cfg: ModelConfig, autocast: bool = False) -> int:
    """A checkpointed block keeps only its input: 2·d bytes per token in bf16, 4·d in fp32
    (autocast keeps the residual stream fp32)."""
    return (4 if autocast else BF16) * cfg.d_model


def head_bytes_per_token(cfg: ModelConfig, autocast: bool = False) -> int:
    """Saved outside the blocks: the token ids the embedding's backward keeps (8), the RoPE
    cos and sin tables in bf16 that every block's q and k share (2·2·head_dim), the final
    RMSNorm's input (2·d; 4·d in fp32 under autocast) and 1/rms (4), and the hidden state's
    gradient, which the fused loss computes in the forward and keeps for the backward (2·d)."""
    return (6 if autocast else 4) * cfg.d_model + 4 * cfg.head_dim + 12


def checkpointed_layers(cfg: ModelConfig, mode: Checkpointing, every: int) -> int:
    """How many blocks train/parallelize.py checkpoints (block i when i % every == 0)."""
    if mode == "none":
        return 0
    step = 1 if mode == "full" else every
    return len(range(0, cfg.num_layers, step))


def activation_bytes(
    cfg: ModelConfig,
    tokens: int,
    mode: Checkpointing = "none",
    every: int = 2,
    autocast: bool = False,
) -> int:
    """Activations saved for the backward of one micro-batch of `tokens` tokens (per rank), with
    bf16 weights (FSDP) or, `autocast`, fp32 weights and bf16 matmuls (one process, DDP).

    Without checkpointing: L · A · tokens, A = activation_bytes_per_token_layer. With k blocks
    checkpointed, those keep their input instead of A, and the backward recomputes one of them
    at a time, which adds one block's A · tokens at the peak.
    """
    full = activation_bytes_per_token_layer(cfg, autocast)
    kept = checkpointed_bytes_per_token_layer(cfg, autocast)
    k = checkpointed_layers(cfg, mode, every)
    per_token = (cfg.num_layers - k) * full + k * kept + (full if k else 0)
    return (per_token + head_bytes_per_token(cfg, autocast)) * tokens


def logit_bytes(cfg: ModelConfig, tokens: int, chunk_tokens: int) -> int:
    """The loss's own memory: the one cross-entropy chunk whose logits exist at a time
    (LOGIT_BYTES per logit), and the fp32 head-weight gradient that the fused loss computes in
    the forward and keeps until the backward (4·V·d, whole: it is the gathered weight's)."""
    live = tokens if chunk_tokens <= 0 else min(tokens, chunk_tokens)
    return LOGIT_BYTES * live * cfg.vocab_size + 4 * cfg.vocab_size * cfg.d_model


def block_params(cfg: ModelConfig) -> int:
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    return (cfg.num_params(embeddings=False) - cfg.d_model - head) // cfg.num_layers


def state_bytes(cfg: ModelConfig, shards: int) -> float:
    """fp32 weights, gradients and AdamW moments, 16·P bytes, split over `shards` ranks."""
    return STATE_BYTES_PER_PARAM * cfg.num_params() / shards


def gathered_bytes(cfg: ModelConfig, strategy: str, reshard_after_forward: bool = True) -> int:
    """bf16 parameters materialised for compute. FSDP: the root (embedding, final norm, head),
    which stays gathered, plus two blocks (the one running and the one prefetched), 2 bytes each;
    without resharding after the forward every block stays gathered until its backward. DDP:
    autocast's bf16 copy of every weight."""
    if strategy == "ddp" or not reshard_after_forward:
        return BF16 * cfg.num_params()
    root = cfg.num_params() - cfg.num_layers * block_params(cfg)
    return BF16 * (root + 2 * block_params(cfg))


@dataclass(frozen=True)
class Memory:
    """Estimated peak bytes per GPU."""

    states: float
    gathered: float
    activations: float
    """In the planned checkpointing mode."""
    activations_none: float
    activations_full: float
    logits: float

    @property
    def total(self) -> float:
        return self.states + self.gathered + self.activations + self.logits


@dataclass(frozen=True)
class StagePlan:
    name: str
    seq_len: int
    rope_theta: float
    tokens: int
    steps: int
    batch_tokens: int
    sequences_per_step: float
    micro_batch_size: int
    grad_accum: int | None
    """Micro-batches per rank per step; None when the batch does not split evenly."""
    accum_error: str | None
    flops_per_token: float
    flops: float
    seconds: float
    memory: Memory
    notes: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    gpus: int
    gpu: str
    gpu_name: str
    peak_flops: float
    memory_gb: float
    mfu: float
    checkpointing: Checkpointing
    checkpoint_every: int
    strategy: str
    params: int
    params_non_embedding: int
    stages: tuple[StagePlan, ...]

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.stages)

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def flops(self) -> float:
        return sum(s.flops for s in self.stages)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def peak_memory(self) -> float:
        return max(s.memory.total for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for stage, plan in zip(out["stages"], self.stages, strict=True):
            stage["memory"]["total"] = plan.memory.total
        out["totals"] = {
            "tokens": self.tokens,
            "steps": self.steps,
            "flops": self.flops,
            "seconds": self.seconds,
            "peak_memory": self.peak_memory,
        }
        return out


def plan_recipe(
    recipe: Recipe,
    gpus: int,
    gpu: str = "h100",
    mfu: float = 0.4,
    checkpointing: Checkpointing | None = None,
) -> Plan:
    """The plan of every resolved stage of `recipe` on `gpus` GPUs of kind `gpu`, at `mfu` of
    the card's peak; `checkpointing` None takes recipe.parallel.activation_checkpointing."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    if gpu not in GPUS:
        raise ValueError(f"--gpu: unknown GPU {gpu!r}; one of {sorted(GPUS)}")
    card = GPUS[gpu]
    mode = checkpointing or recipe.parallel.activation_checkpointing
    every = recipe.parallel.checkpoint_every
    cfg = recipe.model
    stages = tuple(_plan_stage(s, recipe, gpus, card, mfu, mode) for s in recipe.resolved_stages())
    return Plan(
        gpus=gpus,
        gpu=gpu,
        gpu_name=card.name,
        peak_flops=card.peak_flops,
        memory_gb=card.memory_gb,
        mfu=mfu,
        checkpointing=mode,
        checkpoint_every=every,
        strategy=_strategy(recipe, gpus),
        params=cfg.num_params(),
        params_non_embedding=cfg.num_params(embeddings=False),
        stages=stages,
    )


def _strategy(recipe: Recipe, gpus: int) -> str:
    return recipe.parallel.strategy if gpus > 1 else "ddp"  # one process: nothing sharded


def _plan_stage(
    stage: Stage, recipe: Recipe, gpus: int, card: GPU, mfu: float, mode: Checkpointing
) -> StagePlan:
    cfg, every, strategy = recipe.model, recipe.parallel.checkpoint_every, _strategy(recipe, gpus)
    chunk = recipe.train.loss_chunk_tokens
    if chunk is None:
        chunk = auto_loss_chunk(cfg.vocab_size, "cuda")
    try:
        accum: int | None = grad_accum_steps(stage, gpus)  # the trainer's own rule
        error = None
    except ValueError as e:
        accum, error = None, str(e)
    micro_tokens = stage.micro_batch_size * stage.seq_len
    shards = gpus if strategy == "fsdp" else 1
    autocast = strategy != "fsdp"  # FSDP casts the weights to bf16; the rest use autocast
    memory = Memory(
        states=state_bytes(cfg, shards),
        gathered=gathered_bytes(cfg, strategy, recipe.parallel.reshard_after_forward),
        activations=activation_bytes(cfg, micro_tokens, mode, every, autocast),
        activations_none=activation_bytes(cfg, micro_tokens, "none", autocast=autocast),
        activations_full=activation_bytes(cfg, micro_tokens, "full", autocast=autocast),
        logits=logit_bytes(cfg, micro_tokens, chunk),
    )
    flops_per_token = cfg.flops_per_token(stage.seq_len)
    flops = flops_per_token * stage.tokens
    sequences = stage.batch_tokens / stage.seq_len
    notes = []
    if error is not None:
        notes.append(f"grad-accum does not divide: {error}")
    if sequences < gpus:
        notes.append(
            f"{sequences:g} rows per step for {gpus} GPUs: data parallelism alone leaves GPUs "
            "idle; splitting a row over GPUs needs context parallelism, which lmforge lacks"
        )
    if memory.total > card.memory_gb * 1e9:
        hint = ""
        if mode != "full":
            full = dataclasses.replace(memory, activations=memory.activations_full)
            hint = f"; with full activation checkpointing {full.total / 1e9:,.1f} GB"
        notes.append(
            f"needs ~{memory.total / 1e9:,.1f} GB per GPU, more than the "
            f"{card.memory_gb:g} GB of a {card.name}{hint}"
        )
    return StagePlan(
        name=stage.name,
        seq_len=stage.seq_len,
        rope_theta=stage.rope_theta,
        tokens=stage.tokens,
        steps=stage.steps,
        batch_tokens=stage.batch_tokens,
        sequences_per_step=sequences,
        micro_batch_size=stage.micro_batch_size,
        grad_accum=accum,
        accum_error=error,
        flops_per_token=flops_per_token,
        flops=flops,
        seconds=flops / (gpus * card.peak_flops * mfu),
        memory=memory,
        notes=tuple(notes),
    )


# --- the table printer -------------------------------------------------------------------------


def format_plan(plan: Plan, title: str = "") -> str:
    """Two markdown tables (schedule and compute; memory per GPU), totals and notes."""
    mode: str = plan.checkpointing
    if mode == "every":
        mode = f"every {plan.checkpoint_every} blocks (0, {plan.checkpoint_every}, ...)"
    split = f"{plan.strategy.upper()} over {plan.gpus}" if plan.gpus > 1 else "one process"
    head = [
        f"plan{f' {title}' if title else ''}: {plan.gpus} × {plan.gpu_name} "
        f"({plan.peak_flops / 1e12:,.0f} TFLOP/s dense bf16, {plan.memory_gb:g} GB) at MFU "
        f"{plan.mfu:g}; {split}; activation checkpointing: {mode}",
        f"model: {_si(plan.params)} parameters ({_si(plan.params_non_embedding)} without the "
        "input embedding)",
        "",
    ]
    rows = []
    for s in plan.stages:
        accum = str(s.grad_accum) if s.grad_accum is not None else "does not divide"
        rows.append(
            [s.name, f"{s.seq_len:,}", f"{s.rope_theta:,.0f}", _si(s.tokens), f"{s.steps:,}",
             f"{s.batch_tokens:,}", f"{s.sequences_per_step:,.6g}", s.micro_batch_size, accum,
             _sci(s.flops_per_token), _sci(s.flops), _duration(s.seconds)]
        )  # fmt: skip
    rows.append(
        ["**total**", "", "", _si(plan.tokens), f"{plan.steps:,}", "", "", "", "", "",
         _sci(plan.flops), _duration(plan.seconds)]
    )  # fmt: skip
    schedule = _table(
        ["stage", "seq_len", "rope_theta", "tokens", "steps", "tokens/step", "seqs/step",
         "micro", "grad-accum/rank", "FLOPs/token", "FLOPs", "time"],
        rows,
    )  # fmt: skip
    gb = plan.memory_gb * 1e9
    mem_rows = []
    for s in plan.stages:
        m = s.memory
        fits = "yes" if m.total <= 0.9 * gb else "tight" if m.total <= gb else "**no**"
        mem_rows.append(
            [s.name, _gb(m.states), _gb(m.gathered), _gb(m.activations_none),
             _gb(m.activations_full), _gb(m.logits), _gb(m.total), fits]
        )  # fmt: skip
    memory = _table(
        ["stage", "fp32 params+grads+AdamW", "gathered bf16", "activations (no AC)",
         "activations (full AC)", "loss (logit chunk, head grad)", f"total (AC: {mode})",
         f"fits {plan.memory_gb:g} GB"],
        mem_rows,
    )  # fmt: skip
    notes = [f"- {s.name}: {n}" for s in plan.stages for n in s.notes]
    legend = (
        "GB per GPU; states = 16 B/param sharded over the GPUs; activations per micro-batch "
        "(bytes per token per block: (12·d + 4·kv + 4·f + 4·H + 8) without, 2·d with "
        "checkpointing); "
        "FLOPs/token = 6N + 12·L·d·T (PaLM's count; document masking does less attention "
        "work); time = FLOPs / (GPUs × peak × MFU)."
    )
    total = (
        f"total: {_si(plan.tokens)} tokens in {plan.steps:,} steps, {_sci(plan.flops)} FLOPs, "
        f"{_duration(plan.seconds)} on {plan.gpus} GPU{'s' if plan.gpus > 1 else ''} "
        f"({plan.seconds * plan.gpus / 3600:,.6g} GPU-hours); peak memory "
        f"{_gb(plan.peak_memory)} GB per GPU"
    )
    parts = [*head, schedule, "", total, "", "memory per GPU (GB):", memory, "", legend]
    if notes:
        parts += ["", "notes:", *notes]
    return "\n".join(parts)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _si(n: float) -> str:
    """1.8T, 400B, 5.24M, 840K."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:g}"


def _sci(x: float) -> str:
    """2.71e7, 1.9e22."""
    return f"{x:.3g}".replace("e+0", "e").replace("e+", "e")


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.3g} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 86400:.3g} d"
