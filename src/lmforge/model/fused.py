"""RMSNorm and the SwiGLU tail as autograd functions that keep only their inputs for backward.

Left to autograd, each element-wise op saves its own operands. For the reference config, fp32,
a block then keeps 49.5 KB per token. Each RMSNorm keeps its input and the normalised tensor.
SwiGLU keeps gate, silu(gate), up and their product, four d_ff-wide tensors; the product is
the one down_proj's weight gradient needs. The functions here keep the inputs: x and the
per-token 1/rms for a norm, gate and up for SwiGLU. The backward recomputes the element-wise
intermediates, a few reads of tensors it loads anyway, and no matmul is repeated. That saves
2·d_ff + d floats per token and block, 31% of the block's activations. torch.compile's
partitioner makes the same trade on its own (benchmarks/notes/training.md, section 3). The
forward runs the same ops in the same order as the plain modules, so outputs are bit-identical;
gradients equal autograd's to rounding (tests/model/test_fused.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight · x / rms(x), normalised in fp32 and cast back to x's dtype before the weight
    multiplies it (as HF Llama)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return _rms_norm(x, weight, eps)[0]


def swiglu_down(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """(silu(gate) · up) @ downᵀ: the SwiGLU product and the down projection (down: the
    (d_model, d_ff) weight). Under autocast the matmul runs in the autocast dtype, as F.linear
    would."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (gate, up, down)):
        return _SwiGLUDown.apply(gate, up, down)
    return F.linear(F.silu(gate) * up, down)


def _rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and the 1/rms per token, in fp32 (fp64 for fp64 x)."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    inv_rms = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h * inv_rms).to(x.dtype), inv_rms


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        y, inv_rms = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, inv_rms)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        x, weight, inv_rms = ctx.saved_tensors
        h = x.to(inv_rms.dtype)
        normed = (h * inv_rms).to(x.dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_y * normed).flatten(0, -2).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad_y * weight).to(x.dtype).to(h.dtype)  # grad of `normed`, cast as autograd does
            # d/dh of h·r with r = (mean(h²) + eps)^-1/2: r·g - h·r³·mean(g·h)
            grad_h = inv_rms * g - h * inv_rms.pow(3) * (g * h).mean(-1, keepdim=True)
            grad_x = grad_h.to(x.dtype)
        return grad_x, grad_w, None


class _SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up, down)
        return F.linear(F.silu(gate) * up, down)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        gate, up, down = ctx.saved_tensors
        silu = F.silu(gate)
        dy = grad_y.flatten(0, -2)
        grad_down = None
        if ctx.needs_input_grad[2]:
            product = (silu * up).flatten(0, -2)
            grad_down = (dy.t() @ product).to(down.dtype)
        grad_product = (dy @ down.to(dy.dtype)).view(gate.shape).to(gate.dtype)
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad_product * up, gate)
        if ctx.needs_input_grad[1]:
            grad_up = grad_product * silu
        return grad_gate, grad_up, grad_down
