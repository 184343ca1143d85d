"""A bias-free linear layer whose few-token case reads the weights faster.

Decoding multiplies one token's activations per sequence by every weight matrix: the work is
reading the weights, so its speed is memory bandwidth. With fp32 weights on CPU, `F.linear` on
a few rows (x @ W.T: MKL's matrix-matrix kernel with a transposed weight) read them slowly:

- one row: `torch.mv` (sgemv) decoded the reference model 1.42x faster (66.6 vs 46.9 tok/s);
- 2 to 64 rows: `W @ x.T` (the weight untransposed), copied back to row order. Inside the
  model the 32000-wide head took 0.4-0.8x F.linear's time (batch 4: 6.0-6.6 vs 14.8-20.7 ms),
  the block products 0.6-1.0x, and batched decoding ran 1.45x faster at 4 rows, 1.09x at 8
  and 1.10x at 16;

at 128 rows and more the two are level. bf16 weights were slower on both paths, so only fp32
CPU weights take them (benchmarks/notes/decode.md §1 and §5). Everything else is `nn.Linear`:
same parameters, same state-dict keys, same function (to rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SMALL_ROWS = 64
"""Inputs of up to this many rows (tokens) take `weight @ x.T` with fp32 CPU weights."""


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (
            rows <= SMALL_ROWS
            and self.weight.dtype == torch.float32  # bf16 measured slower on both paths
            and self.weight.device.type == "cpu"  # where it was measured
            and not torch.is_autocast_enabled(x.device.type)
        ):
            flat = x.reshape(rows, self.in_features)
            if rows == 1:
                out = torch.mv(self.weight, flat[0])
            else:  # (out, in) @ (in, rows), then back to (rows, out) in row order
                out = torch.mm(self.weight, flat.t()).t().contiguous()
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight)
