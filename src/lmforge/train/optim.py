"""AdamW with decoupled weight decay on projection matrices (not on norms or embeddings)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.ranges import check_ranges


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate (the schedule scales it)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on 2-D weights except embeddings."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient L2 norm to this; 0 disables clipping."""
    implementation: str = "fused"
    """`fused`: torch's single-kernel AdamW (CPU and CUDA; one pass over each parameter, 6x
    faster than foreach for the 50M reference model on a Xeon CPU); `foreach`: multi-tensor ops,
    for devices without the fused kernel."""

    def __post_init__(self) -> None:
        check_ranges(self, positive=("eps",), non_negative=("lr", "weight_decay", "grad_clip"))
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.implementation not in ("fused", "foreach"):
            raise ValueError(
                f"optim.implementation must be fused or foreach, got {self.implementation!r}"
            )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay projection matrices; leave norms and the input embedding undecayed."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and "embed_tokens" not in name else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=cfg.implementation == "fused",
        foreach=cfg.implementation == "foreach",
    )
