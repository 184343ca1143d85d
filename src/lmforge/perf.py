"""Measured matmul peak of this machine, the denominator of model FLOPs utilisation (MFU)."""

from __future__ import annotations

import ctypes
import functools
import platform
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


@functools.lru_cache(maxsize=4)
def bf16_is_fast(device_type: str) -> bool:
    """Whether bf16 matmuls beat fp32 here: CPUs without native bf16 (no AVX512-BF16 / AMX, e.g.
    a Cascade Lake Xeon: 46 vs 145 GFLOP/s) emulate it at a fraction of the fp32 speed."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)  # V100/T4: emulated
    if device_type != "cpu":
        return False
    fp32 = measure_matmul_peak(torch.float32, "cpu", n=512, repeats=4)
    bf16 = measure_matmul_peak(torch.bfloat16, "cpu", n=512, repeats=4)
    return bf16 > 1.2 * fp32


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting: "bf16", "fp32" (None), or "auto" (bf16 where
    it is faster than fp32 on this device, else fp32)."""
    if precision == "bf16" or (precision == "auto" and bf16_is_fast(device.type)):
        return torch.bfloat16
    return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_INT_MAX = 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc serve large tensors from its heap and keep what is freed for reuse.

    By default glibc serves each allocation above its mmap threshold (128 KiB at first, rising
    with use to at most 32 MiB) with fresh pages from the kernel and unmaps them on free, so
    each new activation, gradient or logits chunk of a training step costs one page fault per
    4 KiB touched. On the 2 vCPU VM we measured, steps ran 1.13-1.33x faster without them
    (benchmarks/RESULTS.md). The process's resident memory then stays at its peak instead of
    falling between steps, which a training run reaches every step anyway. Returns whether it
    applied (glibc only; once per process, as it cannot be undone).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _INT_MAX) and mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
