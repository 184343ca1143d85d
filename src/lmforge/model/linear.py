"""A bias-free linear layer whose one-token case is a matrix-vector product.

Decoding one sequence multiplies a single token's activations by every weight matrix: the work
is reading the weights, so its speed is memory bandwidth. `F.linear` on a (1, in) input takes
the matrix-matrix path, which on CPU (sgemm with M = 1) reads the weights 2-3x slower than
`torch.mv` (sgemv) does: benchmarks/notes/decode.md has the measurements. Everything else is
`nn.Linear`: same parameters, same state-dict keys, same function (to rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features and not torch.is_autocast_enabled(x.device.type):
            return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight)
