"""A bias-free linear layer whose few-token case reads the weights faster.

Decoding multiplies one token's activations per sequence by every weight matrix: the work is
reading the weights, so its speed is memory bandwidth. With fp32 weights on CPU, `F.linear` on
a few rows (x @ W.T: MKL's matrix-matrix kernel with a transposed weight) read them slowly:

- one row: `torch.mv` (sgemv) decoded the reference model 1.42x faster (66.6 vs 46.9 tok/s)
  on an Intel Xeon; on AMD, where MKL's kernels are generic, oneDNN's product is faster still
  (`ONEDNN_FOR_ONE_ROW`; eager and without gradients only);
- 2 to 64 rows: `W @ x.T` (the weight untransposed), copied back to row order. On a 2-core
  AMD EPYC (AVX2; oneDNN level with it on the head, slower on the block shapes), inside the
  model the 32000-wide head took 0.4-0.8x F.linear's time (batch 4: 6.0-6.6 vs 14.8-20.7 ms),
  the block products 0.6-1.0x, and batched decoding ran 1.45x faster at 4 rows, 1.09x at 8
  and 1.10x at 16;

at 128 rows and more the two are level. bf16 weights were slower on both eager paths where
bf16 is emulated, so there only fp32 CPU weights take them (benchmarks/notes/decode.md §1 and
§5); with AVX512-BF16, one bf16 row takes `mv` too (`BF16_MV_FOR_ONE_ROW`). Compiled, one
row takes `mv` in every dtype: inductor turns it into one pass over the weights, where bf16
weights otherwise went to an external matrix kernel (bf16 decoding 90 -> 97 tok/s, decode.md
§11). Everything else is `nn.Linear`: same parameters, same state-dict keys, same function (to
rounding).
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn

SMALL_ROWS = 64
"""Inputs of up to this many rows (tokens) take `weight @ x.T` with fp32 CPU weights."""


def _amd_cpu() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in f)
    except OSError:  # not Linux
        return "AMD" in platform.processor()


ONEDNN_FOR_ONE_ROW = torch.backends.mkldnn.is_available() and _amd_cpu()
"""One-row fp32 products through oneDNN rather than MKL's sgemv on AMD CPUs, where MKL runs
generic kernels: on a 2-core AMD EPYC (AVX2) that decoded the reference model 1.41x faster
(32.3 -> 45.7 tok/s, same greedy ids). Elsewhere sgemv is what was measured (above). A constant,
not a cached call: compiled decoding reads it as one."""


BF16_MV_FOR_ONE_ROW = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
"""One-row products with bf16 CPU weights through `torch.mv` where the CPU has AVX512-BF16:
on a 2-core Xeon with AMX that decoded the reference model in bf16 1.32x faster (95.0 -> 125.5
tok/s, same greedy ids; decode.md §13). Where bf16 is emulated (a Cascade Lake Xeon), bf16 mv
was slower than `F.linear` (61.1 vs 77.2 tok/s), so there bf16 keeps `F.linear`."""


def _eager_without_grad() -> bool:
    """oneDNN's op has no backward, and inductor cannot lower it with a plain weight."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        on_cpu = self.weight.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
        fp32 = self.weight.dtype == torch.float32
        bf16_mv = BF16_MV_FOR_ONE_ROW and self.weight.dtype == torch.bfloat16
        if on_cpu and rows == 1 and (fp32 or bf16_mv or torch.compiler.is_compiling()):
            flat = x.reshape(1, self.in_features)
            if fp32 and ONEDNN_FOR_ONE_ROW and _eager_without_grad():
                out = torch.ops.mkldnn._linear_pointwise(flat, self.weight, None, "none", [], "")
            else:  # compiled, inductor turns mv into a loop that reads each weight once
                out = torch.mv(self.weight, flat[0])
        elif on_cpu and fp32 and rows <= SMALL_ROWS:
            # (out, in) @ (in, rows), then back to (rows, out) in row order
            flat = x.reshape(rows, self.in_features)
            out = torch.mm(self.weight, flat.t()).t().contiguous()
        else:
            return F.linear(x, self.weight)
        return out.view(*x.shape[:-1], self.out_features)
