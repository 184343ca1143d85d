"""Rotary position embeddings (Su et al. 2021) from explicit per-token positions, half-split layout.

Half-split (`rotate_half`) is the layout HF Llama uses, so exported q/k weights need no permutation.
Positions are passed in rather than implied by index, so packed rows can restart them per document.
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables for integer positions (B, T) → two (B, T, head_dim) tensors.

    Always fp32: in bf16 the angles of positions past 256 would already be rounded.
    """
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, D)
    return angles.cos(), angles.sin()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype that projections of x come out in: autocast's where it is on (it leaves fp64
    alone), else x's."""
    device = x.device.type
    if x.dtype == torch.float64 or not torch.amp.is_autocast_available(device):  # e.g. meta
        return x.dtype
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by tables (B, T, D), in x's dtype (tables already in it are not
    copied)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, D)
    return x * cos + rotate_half(x) * sin
