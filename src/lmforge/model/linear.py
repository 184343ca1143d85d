"""A bias-free linear layer whose one-token case is a matrix-vector product.

Decoding one sequence multiplies a single token's activations by every weight matrix: the work
is reading the weights, so its speed is memory bandwidth. `F.linear` on a (1, in) input takes
the matrix-matrix path; with fp32 weights on CPU, `torch.mv` (sgemv) decoded the reference model
1.42x faster (66.6 vs 46.9 tok/s), with bf16 weights slower (61.1 vs 77.2), so only fp32 CPU
weights take it (benchmarks/notes/decode.md). Everything else is `nn.Linear`: same parameters,
same state-dict keys, same function (to rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.numel() == self.in_features
            and self.weight.dtype == torch.float32  # bf16 sgemv measured slower than F.linear
            and self.weight.device.type == "cpu"  # where it was measured
            and not torch.is_autocast_enabled(x.device.type)
        ):
            return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight)
