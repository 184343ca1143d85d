"""The training loop: batch, forward, loss, backward, clip, step, guard, log, eval, save.

Global `batch_tokens` is the math; the gradient-accumulation count is derived from it, the
micro-batch size, the sequence length and the world size. The loss of a step is the mean over
all its target tokens on all ranks (summed per micro-batch, divided by the step's global
total), so 4 micro-batches of 1 row equal 1 micro-batch of 4 rows, and 2 ranks equal 1.
Distribution itself lives in parallelize.py; under torchrun every rank runs `train`.
At a stage boundary (stages.py) the row length, micro-batch, accumulation and RoPE base switch
between two steps; the data stream continues where it was.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

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
from lmforge.perf import autocast_dtype, keep_freed_memory, measure_matmul_peak
from lmforge.train.config import TrainConfig, auto_loss_chunk, grad_accum_steps
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
    trainer = _Trainer(
        model, loader, cfg, optim_cfg, stages, run_dir, recipe, evaluate, eval_every_steps,
        parallel or ParallelConfig(), SpikeGuard(guard_cfg or GuardConfig()),
    )  # fmt: skip
    trainer.restore(resume)
    return trainer.run()


class _Trainer:
    """One call of `train`: what the loop carries from step to step, and what a step does."""

    def __init__(
        self,
        model: Llama,
        loader: BatchSource,
        cfg: TrainConfig,
        optim_cfg: OptimConfig,
        stages: tuple[Stage, ...],
        run_dir: Path,
        recipe: dict[str, Any],
        evaluate: Callable[[Llama, int], dict[str, float]] | None,
        eval_every_steps: int,
        parallel: ParallelConfig,
        guard: SpikeGuard,
    ) -> None:
        self.model, self.loader, self.cfg, self.optim_cfg = model, loader, cfg, optim_cfg
        self.stages, self.run_dir, self.recipe, self.guard = stages, run_dir, recipe, guard
        self.evaluate, self.eval_every_steps = evaluate, eval_every_steps
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu" and cfg.keep_freed_memory:
            keep_freed_memory()
        self.world = world_size()
        amp_dtype = autocast_dtype(cfg.precision, self.device)
        model.to(self.device).train()
        self.forward = parallelize(model, parallel, amp_dtype, cfg.compile)
        # FSDP casts parameters itself; the rest run under autocast
        self.step_amp = amp_dtype if uses_autocast(parallel) else None
        self.optimizer = build_optimizer(model, optim_cfg)
        for stage in stages:
            grad_accum_steps(stage, self.world)  # a misfit batch of a later stage fails now
        chunk = cfg.loss_chunk_tokens
        self.loss_chunk = (
            auto_loss_chunk(model.cfg.vocab_size, self.device.type) if chunk is None else chunk
        )
        self.last_step = total_steps(stages)
        self.end_step = min(self.last_step, cfg.stop_at_step or self.last_step)
        self.ckpt_dir = checkpoint_dir(run_dir)
        # the peak's test matrices draw random numbers: before the RNG is set to the checkpoint's
        self.peak = measure_matmul_peak(amp_dtype or torch.float32, self.device) * self.world
        self.step = self.tokens = 0
        self.records: list[dict[str, Any]] = []
        self.metrics: MetricsWriter | None = None
        self.pending: PendingCheckpoint | None = None
        self.active: Stage | None = None
        self.batches: Iterator[PackedBatch] = iter(())
        self.accum = 0

    def restore(self, resume: bool) -> None:
        """Start from the newest good checkpoint (--resume) or step 0; drop the records past it."""
        step, tokens = _restore(
            self.ckpt_dir, resume, self.model, self.optimizer, self.loader, self.guard
        )
        expected = tokens_at_step(self.stages, step)
        if tokens != expected:  # the loop counts steps, the stages tokens
            raise ValueError(
                f"{self.ckpt_dir}: the checkpoint is at step {step} after {tokens} tokens, where"
                f" this recipe's stages put {expected}: batch_tokens or the stages changed since"
                " the run began. Resume with its recipe (in the checkpoint's trainer.json;"
                " adding tokens at the end is fine), or start a new run_dir"
            )
        self.step, self.tokens = step, tokens
        if rank() == 0:  # records past the checkpoint are redone
            _truncate_jsonl(self.run_dir / "metrics.jsonl", step)
            _truncate_jsonl(self.run_dir / "events.jsonl", step)
            self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl")

    def run(self) -> list[dict[str, Any]]:
        self.bar = progress(self.last_step, "pretrain", initial=self.step, unit="step")
        try:
            while self.step < self.end_step and self._train_step():
                pass
        except BaseException as e:
            # A checkpoint already written is put in place where every rank stops alike (one
            # process, or the guard's verdict, computed from reduced values): finishing is safe.
            if self.pending is not None and (self.world == 1 or isinstance(e, GuardError)):
                try:
                    self.pending.finish()
                except Exception:
                    log.exception("the checkpoint in flight could not be finished")
            self._close()
            raise
        if self.pending is not None:
            self.pending.finish()
        self._close()
        return self.records

    def _train_step(self) -> bool:
        """One optimizer step (or a guard's skip or rewind); False once the data is used up."""
        stage = self._enter(stage_at(self.stages, self.tokens))
        if self.pending is not None and not all_reduce_sum(
            float(not self.pending.written), self.device
        ):
            self.pending.finish()  # every rank's files are written: in place now, not at the
            self.pending = None  # next save (a kill until then would lose it)
        t0 = time.perf_counter()
        # the schedule at the middle of the step's tokens: the first step does not train at
        # lr 0 (warmup's start), nor the last at the end of a cooldown to 0
        lr = stage.lr_at(self.tokens + stage.batch_tokens // 2) * self.guard.lr_scale
        rows_before, loader_before = self.loader.rows, self.loader.state_dict()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = list(itertools.islice(self.batches, self.accum))
        rows = sum(len(b.input_ids) for b in micro)
        short = len(micro) < self.accum or rows < self.accum * stage.micro_batch_size
        if all_reduce_sum(float(short), self.device):  # data used up (on any rank)
            self._stop_at_data_end(stage, loader_before)
            return False
        loss_sum = _accumulate_gradients(
            self.forward, micro, self.device, self.step_amp, self.loss_chunk
        )
        clip = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(self.model, clip)
        event = self.guard.check(loss_sum, grad_norm)
        taken = event is None or event["kind"] == "level_shift"
        if taken:
            self.optimizer.step()
            self.guard.accept(loss_sum, grad_norm, level_shift=event is not None)
        self.optimizer.zero_grad(set_to_none=True)
        if event is not None:
            event = {
                "step": self.step + 1,
                "tokens": self.tokens,
                "stage": stage.name,
                **event,
                "loss": loss_sum,
                "grad_norm": grad_norm,
                "action": "accept" if taken else self.guard.cfg.action,
                "rows": [rows_before, self.loader.rows],
            }
            if self._act_on(event, taken):
                return True  # rewound: the steps after the checkpoint are trained again
        self.step += 1
        self.tokens += stage.batch_tokens
        dt = time.perf_counter() - t0
        flops = self.model.cfg.flops_per_token(stage.seq_len) * stage.batch_tokens
        record: dict[str, Any] = {
            "step": self.step,
            "tokens": self.tokens,
            "loss": loss_sum,
            "lr": lr,
            "grad_norm": grad_norm,
            "tok_per_s": stage.batch_tokens / dt,
            "mfu": flops / dt / self.peak,
            "seq_len": stage.seq_len,
            "stage": stage.name,
            **({"guard": event["kind"]} if event is not None else {}),
            "rope_theta": stage.rope_theta,
        }
        self._log(record, stage)
        if self.step % self.cfg.save_every_steps == 0 or self.step == self.end_step:
            self._save(record)
        return True

    def _enter(self, stage: Stage) -> Stage:
        """At a stage's first step (or after a rewind): its rows, RoPE base, batch iterator."""
        if stage != self.active:
            if self.active is not None:
                log.info(
                    "stage %r begins at step %d (%d tokens)", stage.name, self.step, self.tokens
                )
            enter_stage(self.model, self.loader, stage)
            self.batches = iter(self.loader)
            self.accum = grad_accum_steps(stage, self.world)
            self.active = stage
        return stage

    def _stop_at_data_end(self, stage: Stage, loader_before: dict[str, Any]) -> None:
        """A part of a batch is not trained on (its step would count a whole batch_tokens):
        the checkpoint's loader stands where the last step left it, and says the data ran out."""
        self.loader.load_state_dict(loader_before)
        log.warning("data exhausted after step %d (%d tokens): stopping", self.step, self.tokens)
        last = _record_of(self.step, self.records, self.run_dir / "metrics.jsonl")
        if self.evaluate is not None and last is not None and "val_loss" not in last:
            if last["stage"] == stage.name:  # the model is as it was at that step
                last.update(self.evaluate(self.model, stage.seq_len))  # the end gets its eval
                if self.metrics is not None:
                    self.metrics.rewrite_last(last)
        if self.step > 0:  # saved again if need be
            self._save(last, data_exhausted=True)

    def _act_on(self, event: dict[str, Any], taken: bool) -> bool:
        """Record a guard event and apply its action; True if it rewound to a checkpoint."""
        if not taken:
            self.guard.record_event()
        if event["action"] == "skip_batches":
            for _ in range(self.guard.cfg.skip_next * self.accum):
                next(self.batches, None)
            event["rows"][1] = self.loader.rows
        elif event["action"] == "rewind":
            if self.pending is not None:
                self.pending.finish()
                self.pending = None
            rewound = rewind(
                self.ckpt_dir,
                self.model,
                self.optimizer,
                self.loader,
                self.guard,
                self.cfg.save_every_steps,
            )
            if rewound is not None:
                self.step, self.tokens = rewound
                event["rewound_to_step"] = self.step
        log.warning("loss-spike guard: %s", json.dumps(event))
        if rank() == 0:
            with (self.run_dir / "events.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")
        if "rewound_to_step" not in event:
            return False
        if self.metrics is not None:  # the steps after the checkpoint are redone
            self.metrics.close()
            _truncate_jsonl(self.run_dir / "metrics.jsonl", self.step)
            self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl")
        self.records = [r for r in self.records if r["step"] <= self.step]
        self.bar.n = self.step
        self.bar.refresh()
        self.active = None  # re-enter the stage: rows, RoPE base, a fresh batch iterator
        return True

    def _log(self, record: dict[str, Any], stage: Stage) -> None:
        """Evaluate where due; write the record, the progress bar and, every few steps, a line."""
        step, cfg = self.step, self.cfg
        if self.evaluate is not None and (
            step == self.last_step or (self.eval_every_steps and step % self.eval_every_steps == 0)
        ):
            record.update(self.evaluate(self.model, stage.seq_len))
        if step % cfg.log_every_steps == 0 or step == self.last_step:
            record["tokens_by_source"] = {
                name: sum(per_epoch) for name, per_epoch in self.loader.consumed_tokens().items()
            }
        if self.metrics is not None:
            self.metrics.write(record)
        self.records.append(record)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_per_s']:.0f}")
        if step % cfg.log_every_steps == 0 or step == self.last_step or "val_loss" in record:
            log.info(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))

    def _save(self, record: dict[str, Any] | None = None, data_exhausted: bool = False) -> None:
        """Start a checkpoint (scored by the step's record's val_loss, if it has one). A
        synchronous one is in place when this returns; an asynchronous one is kept pending,
        and put in place once every rank has written its files."""
        if self.pending is not None:  # one save in flight at a time
            self.pending.finish()
            self.pending = None
        val_loss = record.get("val_loss") if record else None
        val_seq_len = record["seq_len"] if val_loss is not None and record else None
        state = TrainerState(
            self.step,
            self.tokens,
            self.loader.state_dict(),
            self.recipe,
            val_loss,
            self.guard.state_dict(),
            val_seq_len,
            data_exhausted,
        )
        cfg = self.cfg
        started = start_checkpoint(
            self.ckpt_dir,
            self.model,
            self.optimizer,
            state,
            cfg.keep_last,
            cfg.keep_best,
            cfg.async_save,
            consolidate=cfg.save_consolidated,
        )
        if cfg.async_save:
            self.pending = started
        else:
            started.finish()

    def _close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()


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
