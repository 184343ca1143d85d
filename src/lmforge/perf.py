"""Measured matmul peak of this machine, the denominator of model FLOPs utilisation (MFU)."""

from __future__ import annotations

import time

import torch


def measure_matmul_peak(
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    n: int = 1024,
    repeats: int = 8,
) -> float:
    """Best observed FLOP/s of an n×n @ n×n matmul (best of `repeats`, after a warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
