"""precision=auto picks bf16 only where bf16 matmuls are measured faster than fp32; freed CPU
memory is kept for reuse where asked."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge import perf


def test_auto_precision_on_cuda_asks_for_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch says bf16 is supported on a V100 or T4 by emulation; auto must not pick it."""
    asked: list[dict] = []

    def supported(**kwargs: bool) -> bool:
        asked.append(kwargs)
        return not kwargs.get("including_emulation", True)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    perf.bf16_is_fast.cache_clear()
    try:
        assert perf.bf16_is_fast("cuda") and asked == [{"including_emulation": False}]
    finally:
        perf.bf16_is_fast.cache_clear()


@pytest.mark.parametrize(("bf16_speed", "expected"), [(3.0, torch.bfloat16), (0.3, None)])
def test_auto_precision_follows_the_measured_matmul_speeds(
    monkeypatch: pytest.MonkeyPatch, bf16_speed: float, expected: torch.dtype | None
) -> None:
    peaks = {torch.float32: 100e9, torch.bfloat16: bf16_speed * 100e9}
    monkeypatch.setattr(perf, "measure_matmul_peak", lambda dtype, *a, **k: peaks[dtype])
    perf.bf16_is_fast.cache_clear()
    try:
        cpu = torch.device("cpu")
        assert perf.autocast_dtype("auto", cpu) == expected
        assert perf.autocast_dtype("bf16", cpu) == torch.bfloat16  # asked for: always
        assert perf.autocast_dtype("fp32", cpu) is None
    finally:
        perf.bf16_is_fast.cache_clear()


_FAULTS_PER_STEP = """
import resource, sys, torch
from lmforge.perf import keep_freed_memory

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 8192), torch.nn.ReLU(), torch.nn.Linear(8192, 256))
x = torch.randn(2048, 256)

def faults_of_a_step() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x).square().mean().backward()  # 64 MiB activations and their gradients
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

applied = keep_freed_memory() if sys.argv[1] == "keep" else True
print(applied, *[faults_of_a_step() for _ in range(8)])
"""


def _faults_per_step(mode: str) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_STEP, mode],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")},
    ).stdout.split()
    assert out[0] == "True"
    return [int(n) for n in out[1:]]


def test_keep_freed_memory_stops_page_faults_on_reused_memory() -> None:
    """By default glibc unmaps every freed tensor over 32 MiB, so each step faults its
    activations in again, one page at a time; with freed memory kept, steps after the first
    few reuse resident pages (glibc's aligned allocations leave some slack, hence the margin)."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages on: a fault maps 2 MiB, the counts below are 4 KiB")
    pages = 64 * 2**20 // resource.getpagesize()
    default, kept = _faults_per_step("default")[4:], _faults_per_step("keep")[4:]
    assert min(default) > pages  # the test can tell: the default faults each step's tensors in
    assert sum(kept) < sum(default) / 2
