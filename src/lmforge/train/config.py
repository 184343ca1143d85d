"""What a training run is asked to do (the recipe's `train:` section), and the two numbers
derived from it that the loop and `lmforge plan` share: the loss chunk and the gradient
accumulation of a stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.ranges import check_ranges
from lmforge.train.stages import Stage


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    max_tokens: int = 1_200_000
    """Training budget in tokens (inputs seen, padding included); with `stages`, their budgets
    sum to the total instead."""
    batch_tokens: int = 2048
    """Global tokens per optimizer step; must be a multiple of micro_batch_size·seq_len·world.
    The demo's small value buys steps: at 1.2M tokens, 2,048 reaches a held-out loss 0.46 lower
    than 8,192 (benchmarks/RESULTS.md)."""
    micro_batch_size: int = 8
    """Rows per forward/backward on each rank."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast with fp32 weights, gradients and loss reduction; plain fp32; or auto:
    bf16 where its matmuls are faster than fp32 here (GPUs, CPUs with AVX512-BF16/AMX)."""
    compile: bool = False
    """torch.compile the training step (per block under FSDP/DDP)."""
    loss_chunk_tokens: int | None = None
    """Cross-entropy this many tokens at a time (each chunk's gradient computed with its
    logits) once a micro-batch holds more, so full fp32 logits never exist at long T; None: as
    many as keep one chunk's logits under 2^24 values (64 MB in fp32) on CPU, 2^27 (512 MB) on
    a GPU (`auto_loss_chunk`); 0: all at once."""
    device: str = "auto"
    """'auto' (cuda if present, else cpu), or a torch device string."""
    keep_freed_memory: bool = True
    """On CPU (glibc): keep memory that tensors free in the process for the next ones instead
    of returning it to the system, which made every new activation page-fault its way in:
    reference steps ran 1.13-1.33x faster with it on an AMX Xeon, bf16 and fp32
    (benchmarks/RESULTS.md). Resident memory then stays at the step's peak between steps; off:
    glibc's default."""
    save_every_steps: int = 100
    """Checkpoint every this many steps, and always at the end."""
    keep_last: int = 2
    """Completed checkpoints to keep."""
    async_save: bool = False
    """Write the optimizer state in a background thread while training continues (finished,
    checksummed and renamed into place before the next save and at the end)."""
    save_consolidated: bool = True
    """Also gather the full weights into model.safetensors on rank 0 at each save; off, only
    the sharded state is written (eval/export read it in one process)."""
    keep_best: bool = False
    """Also keep the checkpoint with the lowest held-out loss among those scored at the newest
    scored one's seq_len (save on eval steps to score every checkpoint: eval.every_steps =
    save_every_steps)."""
    log_every_steps: int = 10
    """Log a line every this many steps (every step goes to metrics.jsonl)."""
    init_from: str | None = None
    """Continual pretraining: start from the weights of one of our checkpoints (a step_*
    folder, or a run dir for its latest) or a Hugging Face Llama folder (config.json +
    model.safetensors) instead of a random init; optimizer and data start fresh, and the
    recipe's stages set RoPE base and lengths."""
    stop_at_step: int | None = None
    """End this job at this step (after a checkpoint), e.g. to fit a time-limited allocation;
    `--resume` continues with the same schedule. None or 0: run to the end."""

    def __post_init__(self) -> None:
        check_ranges(
            self,
            positive=("max_tokens", "batch_tokens", "micro_batch_size", "save_every_steps"),
            non_negative=("loss_chunk_tokens", "keep_last"),
        )
        check_ranges(self, positive=("log_every_steps",), non_negative=("stop_at_step",))


def auto_loss_chunk(vocab_size: int, device_type: str) -> int:
    """Tokens per cross-entropy chunk whose logits stay under 2^24 values on CPU, 2^27 on a
    GPU. There each chunk's ~20 kernel launches cost more than its memory: on an H200 the
    reference model's 16,384-token step ran at 0.70x HF eager in 32 chunks of 524 tokens and
    0.98x in 4 of 4,096, with 3.3 GiB of step memory against HF's 8.6 (benchmarks/RESULTS.md)."""
    return max(1, (2**24 if device_type == "cpu" else 2**27) // vocab_size)


def grad_accum_steps(stage: Stage, world: int) -> int:
    per_pass = stage.micro_batch_size * stage.seq_len * world
    if stage.batch_tokens % per_pass:
        raise ValueError(
            f"stage {stage.name!r}: batch_tokens {stage.batch_tokens} is not a multiple of "
            f"micro_batch_size {stage.micro_batch_size} × seq_len {stage.seq_len} × world "
            f"{world} = {per_pass}"
        )
    return stage.batch_tokens // per_pass
