"""precision=auto picks bf16 only where bf16 matmuls are measured faster than fp32."""

from __future__ import annotations

import pytest
import torch

from lmforge import perf


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
