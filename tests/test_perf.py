"""precision=auto picks bf16 only where bf16 matmuls are measured faster than fp32."""

from __future__ import annotations

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
