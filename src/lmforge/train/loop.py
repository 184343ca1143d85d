"""The training loop in one function: batch, forward, loss, backward, clip, step, log, eval, save.

Global `batch_tokens` is the math; the gradient-accumulation count is derived from it, the
micro-batch size, the sequence length and the world size. The loss of a step is the mean over
all its target tokens on all ranks (summed per micro-batch, divided by the step's global
total), so 4 micro-batches of 1 row equal 1 micro-batch of 4 rows, and 2 ranks equal 1.
Distribution itself lives in parallelize.py; under torchrun every rank runs this function.
At a stage boundary (stages.py) the row length, micro-batch, accumulation and RoPE base switch
between two steps; the data stream continues where it was.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from lmforge.checkpoint import (
    PendingCheckpoint,
    TrainerState,
    clear_unfinished,
    load_newest_good,
    start_checkpoint,
)
from lmforge.checkpoint_dirs import (
    checkpoint_dir,
    checkpoint_step,
    completed_checkpoints,
    latest_checkpoint,
)
from lmforge.data.packing import PackedBatch
from lmforge.dist import rank, resolve_device, world_size
from lmforge.logs import MetricsWriter, progress, read_metrics
from lmforge.model.llama import Llama
from lmforge.perf import autocast_dtype, measure_matmul_peak
from lmforge.ranges import check_ranges
from lmforge.train.guard import GuardConfig, GuardError, SpikeGuard
from lmforge.train.optim import OptimConfig, build_optimizer
from lmforge.train.parallelize import (
    ParallelConfig,
    all_reduce_sum,
    clip_grad_norm,
    gradient_sync,
    parallelize,
    uses_autocast,
)
from lmforge.train.stages import Stage, stage_at, tokens_at_step, total_steps

log = logging.getLogger(__name__)


class BatchSource(Protocol):
    """What the loop reads batches from: the pretraining loader (data/loader.py) or the SFT one
    (data/sft.py). Its state is plain data, the same on every rank."""

    @property
    def rows(self) -> int:
        """Global rows produced so far (the data position events refer to)."""
        ...

    def __iter__(self) -> Iterator[PackedBatch]: ...
    def reshape(self, seq_len: int, batch_size: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def consumed_tokens(self) -> dict[str, list[int]]: ...


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
    many as keep one chunk's logits under 2^24 values (64 MB in fp32); 0: all at once."""
    device: str = "auto"
    """'auto' (cuda if present, else cpu), or a torch device string."""
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


def auto_loss_chunk(vocab_size: int) -> int:
    """Tokens per cross-entropy chunk whose logits stay under 2^24 values."""
    return max(1, 2**24 // vocab_size)


def grad_accum_steps(stage: Stage, world: int) -> int:
    per_pass = stage.micro_batch_size * stage.seq_len * world
    if stage.batch_tokens % per_pass:
        raise ValueError(
            f"stage {stage.name!r}: batch_tokens {stage.batch_tokens} is not a multiple of "
            f"micro_batch_size {stage.micro_batch_size} × seq_len {stage.seq_len} × world "
            f"{world} = {per_pass}"
        )
    return stage.batch_tokens // per_pass


def train(
    model: Llama,
    loader: BatchSource,
    cfg: TrainConfig,
    optim_cfg: OptimConfig,
    stages: tuple[Stage, ...],
    run_dir: Path,
    recipe: dict[str, Any],
    evaluate: Callable[[Llama, int], dict[str, float]] | None = None,
    eval_every_steps: int = 0,
    resume: bool = False,
    parallel: ParallelConfig | None = None,
    guard_cfg: GuardConfig | None = None,
) -> list[dict[str, Any]]:
    """Train through the stages; return the per-step metric records of this call (rank 0
    writes metrics and logs; every rank returns its records). `evaluate(model, seq_len)` gives
    held-out metrics at the current row length."""
    parallel = parallel or ParallelConfig()
    guard = SpikeGuard(guard_cfg or GuardConfig())
    device = resolve_device(cfg.device)
    world = world_size()
    amp_dtype = autocast_dtype(cfg.precision, device)
    model.to(device).train()
    forward = parallelize(model, parallel, amp_dtype, cfg.compile)
    step_amp = amp_dtype if uses_autocast(parallel) else None  # FSDP casts parameters itself
    optimizer = build_optimizer(model, optim_cfg)
    for stage in stages:
        grad_accum_steps(stage, world)  # a misfit batch of a later stage fails now, not then
    loss_chunk = cfg.loss_chunk_tokens
    if loss_chunk is None:
        loss_chunk = auto_loss_chunk(model.cfg.vocab_size)
    last_step = total_steps(stages)
    ckpt_dir = checkpoint_dir(run_dir)
    # the peak's test matrices draw random numbers: before the RNG is set to the checkpoint's
    peak = measure_matmul_peak(amp_dtype or torch.float32, device) * world
    step, tokens = _restore(ckpt_dir, resume, model, optimizer, loader, guard)
    if tokens != tokens_at_step(stages, step):  # the loop counts steps, the stages tokens
        raise ValueError(
            f"{ckpt_dir}: the checkpoint is at step {step} after {tokens} tokens, where this"
            f" recipe's stages put {tokens_at_step(stages, step)}: batch_tokens or the stages"
            " changed since the run began. Resume with its recipe (in the checkpoint's"
            " trainer.json; adding tokens at the end is fine), or start a new run_dir"
        )
    if rank() == 0:  # records past the checkpoint are redone
        _truncate_jsonl(run_dir / "metrics.jsonl", step)
        _truncate_jsonl(run_dir / "events.jsonl", step)
    metrics = MetricsWriter(run_dir / "metrics.jsonl") if rank() == 0 else None
    records: list[dict[str, Any]] = []
    end_step = min(last_step, cfg.stop_at_step or last_step)
    bar = progress(last_step, "pretrain", initial=step, unit="step")
    active: Stage | None = None
    batches: Iterator[PackedBatch] = iter(())
    pending: PendingCheckpoint | None = None

    def save(
        record: dict[str, Any] | None = None, data_exhausted: bool = False
    ) -> PendingCheckpoint | None:
        """Start a checkpoint (scored by the step's record's val_loss, if it has one). A
        synchronous one is in place when this returns; an asynchronous one is returned, and put
        in place once every rank has written its files."""
        if pending is not None:  # one save in flight at a time
            pending.finish()
        val_loss = record.get("val_loss") if record else None
        val_seq_len = record["seq_len"] if val_loss is not None and record else None
        state = TrainerState(
            step,
            tokens,
            loader.state_dict(),
            recipe,
            val_loss,
            guard.state_dict(),
            val_seq_len,
            data_exhausted,
        )
        args = (ckpt_dir, model, optimizer, state, cfg.keep_last, cfg.keep_best, cfg.async_save)
        started = start_checkpoint(*args, consolidate=cfg.save_consolidated)
        if not cfg.async_save:
            started.finish()
            return None
        return started

    try:
        while step < end_step:
            stage = stage_at(stages, tokens)
            if stage != active:
                if active is not None:
                    log.info("stage %r begins at step %d (%d tokens)", stage.name, step, tokens)
                enter_stage(model, loader, stage)
                batches = iter(loader)
                accum = grad_accum_steps(stage, world)
                active = stage
            if pending is not None and not all_reduce_sum(float(not pending.written), device):
                pending.finish()  # every rank's files are written: in place now, not at the
                pending = None  # next save (a kill until then would lose it)
            t0 = time.perf_counter()
            # the schedule at the middle of the step's tokens: the first step does not train
            # at lr 0 (warmup's start), nor the last at the end of a cooldown to 0
            lr = stage.lr_at(tokens + stage.batch_tokens // 2) * guard.lr_scale
            rows_before, loader_before = loader.rows, loader.state_dict()
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = list(itertools.islice(batches, accum))
            short = len(micro) < accum or sum(len(b.input_ids) for b in micro) < accum * (
                stage.micro_batch_size
            )
            if all_reduce_sum(float(short), device):  # data used up (on any rank): a part of a
                # batch is not trained on (its step would count a whole batch_tokens); the
                # checkpoint's loader stands where the last step left it
                loader.load_state_dict(loader_before)
                log.warning("data exhausted after step %d (%d tokens): stopping", step, tokens)
                last = _record_of(step, records, run_dir / "metrics.jsonl")
                if evaluate is not None and last is not None and "val_loss" not in last:
                    if last["stage"] == stage.name:  # the model is as it was at that step
                        last.update(evaluate(model, stage.seq_len))  # the end gets its eval
                        if metrics is not None:
                            metrics.rewrite_last(last)
                if step > 0:  # saved again if need be: the checkpoint says the data ran out
                    pending = save(last, data_exhausted=True)
                break
            loss_sum = _accumulate_gradients(forward, micro, device, step_amp, loss_chunk)
            clip = optim_cfg.grad_clip if optim_cfg.grad_clip > 0 else float("inf")
            grad_norm = clip_grad_norm(model, clip)
            event = guard.check(loss_sum, grad_norm)
            taken = event is None or event["kind"] == "level_shift"
            if taken:
                optimizer.step()
                guard.accept(loss_sum, grad_norm, level_shift=event is not None)
            optimizer.zero_grad(set_to_none=True)
            if event is not None:
                event = {
                    "step": step + 1,
                    "tokens": tokens,
                    "stage": stage.name,
                    **event,
                    "loss": loss_sum,
                    "grad_norm": grad_norm,
                    "action": "accept" if taken else guard.cfg.action,
                    "rows": [rows_before, loader.rows],
                }
                if not taken:
                    guard.record_event()
                if event["action"] == "skip_batches":
                    for _ in range(guard.cfg.skip_next * accum):
                        next(batches, None)
                    event["rows"][1] = loader.rows
                elif event["action"] == "rewind":
                    if pending is not None:
                        pending.finish()
                        pending = None
                    rewound = rewind(
                        ckpt_dir, model, optimizer, loader, guard, cfg.save_every_steps
                    )
                    if rewound is not None:
                        step, tokens = rewound
                        event["rewound_to_step"] = step
                log.warning("loss-spike guard: %s", json.dumps(event))
                if rank() == 0:
                    with (run_dir / "events.jsonl").open("a", encoding="utf-8") as f:
                        f.write(json.dumps(event) + "\n")
                if "rewound_to_step" in event:
                    if metrics is not None:  # the steps after the checkpoint are redone
                        metrics.close()
                        _truncate_jsonl(run_dir / "metrics.jsonl", step)
                        metrics = MetricsWriter(run_dir / "metrics.jsonl")
                    records = [r for r in records if r["step"] <= step]
                    bar.n = step
                    bar.refresh()
                    active = None  # re-enter the stage: rows, RoPE base, a fresh batch iterator
                    continue
            step += 1
            step_tokens = stage.batch_tokens
            tokens += step_tokens
            dt = time.perf_counter() - t0
            record: dict[str, Any] = {
                "step": step,
                "tokens": tokens,
                "loss": loss_sum,
                "lr": lr,
                "grad_norm": grad_norm,
                "tok_per_s": step_tokens / dt,
                "mfu": model.cfg.flops_per_token(stage.seq_len) * step_tokens / dt / peak,
                "seq_len": stage.seq_len,
                "stage": stage.name,
                **({"guard": event["kind"]} if event is not None else {}),
                "rope_theta": stage.rope_theta,
            }
            if evaluate is not None and (
                step == last_step or (eval_every_steps and step % eval_every_steps == 0)
            ):
                record.update(evaluate(model, stage.seq_len))
            if step % cfg.log_every_steps == 0 or step == last_step:
                record["tokens_by_source"] = {
                    name: sum(per_epoch) for name, per_epoch in loader.consumed_tokens().items()
                }
            if metrics is not None:
                metrics.write(record)
            records.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{record['tok_per_s']:.0f}")
            if step % cfg.log_every_steps == 0 or step == last_step or "val_loss" in record:
                log.info(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))
            if step % cfg.save_every_steps == 0 or step == end_step:
                pending = save(record)
    except BaseException as e:
        # A checkpoint already written is put in place where every rank stops alike (one
        # process, or the guard's verdict, computed from reduced values): finishing is safe.
        if pending is not None and (world == 1 or isinstance(e, GuardError)):
            try:
                pending.finish()
            except Exception:
                log.exception("the checkpoint in flight could not be finished")
        bar.close()
        if metrics is not None:
            metrics.close()
        raise
    if pending is not None:
        pending.finish()
    bar.close()
    if metrics is not None:
        metrics.close()
    return records


def _restore(
    ckpt_dir: Path,
    resume: bool,
    model: Llama,
    optimizer: torch.optim.Optimizer,
    loader: BatchSource,
    guard: SpikeGuard,
) -> tuple[int, int]:
    """(step, tokens) to start from: the newest good checkpoint's with --resume, else 0. A run
    dir with checkpoints is never trained over without --resume."""
    clear_unfinished(ckpt_dir)
    last = latest_checkpoint(ckpt_dir)
    if last is not None and not resume:
        raise FileExistsError(
            f"{ckpt_dir} holds checkpoints of an earlier run; pass --resume to continue it, "
            "or use another run_dir (nothing was overwritten)"
        )
    if last is None:
        if resume:
            log.warning("--resume: no checkpoint in %s; starting from step 0", ckpt_dir)
        return 0, 0
    last, state = load_newest_good(ckpt_dir, model, optimizer)
    loader.load_state_dict(state.loader)
    guard.load_state_dict(state.guard)
    log.info("resumed from %s at step %d (%d tokens)", last, state.step, state.tokens)
    return state.step, state.tokens


def _record_of(step: int, records: list[dict[str, Any]], path: Path) -> dict[str, Any] | None:
    """The metrics record of `step`: this call's, or (a run resumed at the step where its
    data ends) the file's last line, which resuming truncated to that step; None if the step
    was not logged."""
    if records:
        return records[-1] if records[-1]["step"] == step else None
    if step == 0 or not path.exists():
        return None
    logged = read_metrics(path)
    return logged[-1] if logged and logged[-1]["step"] == step else None


def _accumulate_gradients(
    forward: torch.nn.Module,
    micro: list[PackedBatch],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    loss_chunk: int,
) -> float:
    """Forward and backward over one step's micro-batches; the step's mean loss over all ranks.

    Each micro-batch's summed loss is divided by the whole step's targets (on every rank), so
    the accumulated gradients are those of the step's mean loss however rows are split. The
    gradient reduction runs on the last micro-batch only."""
    world = world_size()
    targets = all_reduce_sum(sum(b.num_targets for b in micro), device)
    loss_sum = 0.0
    for i, batch in enumerate(micro):
        batch = batch.to(device)
        with (
            gradient_sync(forward, i == len(micro) - 1),
            torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)),
        ):
            loss = forward(  # fp32 sum, divided by the whole step's targets
                batch.input_ids,
                batch.positions,
                labels=batch.labels,
                loss_chunk_tokens=loss_chunk,
            ) / max(targets, 1)
            (loss * world).backward()  # gradients are averaged over ranks: undo the 1/world
        loss_sum += loss.item()
    return all_reduce_sum(loss_sum, device)


def rewind(
    ckpt_dir: Path,
    model: Llama,
    optimizer: torch.optim.Optimizer,
    loader: BatchSource,
    guard: SpikeGuard,
    save_every_steps: int,
) -> tuple[int, int] | None:
    """Reload the newest good checkpoint but keep the loader where it is, so the data from the
    checkpoint up to the offending batch is skipped; scale the learning rate down. Returns the
    checkpoint's (step, tokens), or None (nothing saved yet: the update is only skipped).

    Checkpoints saved every `save_every_steps` come first: one saved off that cadence (where
    `stop_at_step` stopped a run later resumed) would rewind to another step than the run
    without the stop, which resume promises to equal. The others are the fallback when every
    checkpoint on the cadence is corrupt."""
    done = completed_checkpoints(ckpt_dir)
    if not done:
        log.warning("loss-spike guard: no checkpoint to rewind to; the update is skipped")
        return None
    on_cadence = [p for p in done if checkpoint_step(p) % save_every_steps == 0]
    off_cadence = [p for p in done if p not in on_cadence]
    position, kept = loader.state_dict(), guard.state_dict()
    # tried from the end: the newest on the cadence first
    path, state = load_newest_good(ckpt_dir, model, optimizer, off_cadence + on_cadence)
    loader.load_state_dict(position)
    guard.load_state_dict(state.guard)
    guard.events = kept["events"]  # what happened since the checkpoint still counts: the
    guard.in_a_row = kept["in_a_row"]  # streak too, or `patience` would never see a level shift
    guard.lr_scale = kept["lr_scale"] * guard.cfg.rewind_lr_factor
    log.warning("loss-spike guard: rewound to %s", path)
    return state.step, state.tokens


def enter_stage(model: Llama, loader: BatchSource, stage: Stage) -> None:
    """Switch the RoPE base and the row shape; the next batch is cut at the new length."""
    if model.cfg.rope_theta != stage.rope_theta:
        model.cfg = replace(model.cfg, rope_theta=stage.rope_theta)
    loader.reshape(stage.seq_len, stage.micro_batch_size)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _truncate_jsonl(path: Path, step: int) -> None:
    """Keep only the records up to `step` (0 for a fresh run). A last line cut short (a kill or
    a full disk mid-write) is dropped with a warning; a bad line elsewhere is an error."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not a JSON record ({e})") from None
            log.warning("%s:%d: dropping a record cut short (%s)", path, number, e)
            continue
        if record.get("step", 0) <= step:
            kept.append(record)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # left by a kill mid-truncation; the writer appends
    writer = MetricsWriter(tmp)
    for r in kept:
        writer.write(r)
    writer.close()
    tmp.replace(path)
