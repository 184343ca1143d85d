"""The only place the model meets distribution: activation checkpointing → torch.compile →
FSDP2 (`fully_shard` per block, then the root) or DDP.

The order is torchtitan's: checkpointing wraps each block's forward, compile traces the
checkpointed block, and FSDP shards the compiled blocks so each block's parameters are gathered
just before it runs. With bf16 under FSDP, `MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)` computes in bf16 and reduces gradients in fp32 (ChuXin's recipe) while the
sharded master weights and the optimizer stay fp32. One process: the model is left as it is, or
compiled whole, and the loop uses autocast.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.dist import world_size
from lmforge.model.llama import Llama

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    strategy: Literal["fsdp", "ddp"] = "fsdp"
    """How several processes share the work: FSDP2 shards parameters, gradients and optimizer
    state; DDP replicates the model and all-reduces gradients."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; auto: nccl when CUDA is present, else gloo."""
    activation_checkpointing: Literal["none", "full", "every"] = "none"
    """Recompute block activations in the backward pass: none, every block (full), or every
    `checkpoint_every`-th block."""
    checkpoint_every: int = 2
    reshard_after_forward: bool = True
    """FSDP: free gathered parameters after each block's forward (ZeRO-3); False keeps them
    until the backward (ZeRO-2-like: more memory, fewer all-gathers)."""

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")


def init_distributed(cfg: ParallelConfig) -> None:
    """Join the torchrun job's process group (no-op for one process or when already joined)."""
    if world_size() == 1 or dist.is_initialized():
        return
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    log.info("process group: %s, world %d", backend, dist.get_world_size())


def shutdown_distributed() -> None:
    """Leave the process group this process joined (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def apply_activation_checkpointing(model: Llama, cfg: ParallelConfig) -> None:
    """Replace the selected blocks' forward by a checkpointed call (state-dict keys unchanged)."""
    if cfg.activation_checkpointing == "none":
        return
    every = 1 if cfg.activation_checkpointing == "full" else cfg.checkpoint_every
    for i, block in enumerate(model.layers):
        if i % every == 0:
            forward = block.forward
            block.forward = functools.partial(checkpoint, forward, use_reentrant=False)  # type: ignore[method-assign]


def parallelize(
    model: Llama, cfg: ParallelConfig, param_dtype: torch.dtype | None, compile: bool
) -> nn.Module:
    """The module the training step calls; `model` itself keeps its parameters (sharded in place
    under FSDP) for the optimizer and checkpoints."""
    apply_activation_checkpointing(model, cfg)
    if not is_distributed():
        return cast(nn.Module, torch.compile(model)) if compile else model  # most fusion
    if compile:  # per block, so FSDP's hooks stay between the compiled regions
        for block in model.layers:
            block.compile()
    if cfg.strategy == "ddp":
        device_ids = [model.embed_tokens.weight.device] if torch.cuda.is_available() else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward)
    return model


def uses_autocast(cfg: ParallelConfig) -> bool:
    """FSDP casts parameters itself (MixedPrecisionPolicy); everything else uses autocast."""
    return not (is_distributed() and cfg.strategy == "fsdp")


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient reduction on all but the last micro-batch of a step."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel) and not enabled:
        with wrapped.no_sync():
            yield
        return
    from torch.distributed.fsdp import FSDPModule

    if isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(enabled)
    yield


def all_reduce_sum(value: float, device: torch.device) -> float:
    """Sum of a number over all ranks (itself with one process)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip by the global gradient norm; sharded (DTensor) gradients are reduced first."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total: Any = torch.nn.utils.get_total_norm(grads, foreach=True)
    if hasattr(total, "full_tensor"):  # DTensor: a partial norm per shard
        total = total.full_tensor()
    if max_norm != float("inf"):
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, total, foreach=True)
    return float(total.item())
