"""RMSNorm and the SwiGLU tail, as functions that save only their inputs, compute what plain
autograd computes: the same outputs bit for bit, the same gradients to rounding, and fewer saved
bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.config import ModelConfig
from lmforge.model.fused import rms_norm, swiglu_down
from lmforge.model.llama import MLP, RMSNorm

EPS = 1e-5


def _plain_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _plain_swiglu_down(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(gate) * up, down)


def _run(fn, inputs: list[torch.Tensor], amp: bool = False, seed: int = 1):
    """The output and every input's gradient for a random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = fn(*leaves)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def _norm_inputs(x_dtype: torch.dtype, w_dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 64, generator=g) * 3).to(x_dtype)
    w = (1 + 0.1 * torch.randn(64, generator=g)).to(w_dtype)
    return [x, w]


def _mlp_inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(2, 7, 48, generator=g).to(dtype)
    up = torch.randn(2, 7, 48, generator=g).to(dtype)
    down = (0.1 * torch.randn(16, 48, generator=g)).to(dtype)
    return [gate, up, down]


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    assert got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * ref.abs().max().item())


@pytest.mark.parametrize(
    "x_dtype, w_dtype, rtol",
    [
        (torch.float32, torch.float32, 1e-5),
        (torch.bfloat16, torch.float32, 1e-2),  # bf16 residual, fp32 weight (autocast training)
        (torch.bfloat16, torch.bfloat16, 1e-2),  # FSDP's bf16 parameters
    ],
)
def test_rms_norm_equals_plain_autograd(x_dtype, w_dtype, rtol: float) -> None:
    inputs = _norm_inputs(x_dtype, w_dtype)
    ref_out, ref_grads = _run(lambda x, w: _plain_rms_norm(x, w, EPS), inputs)
    out, grads = _run(lambda x, w: rms_norm(x, w, EPS), inputs)
    assert torch.equal(out, ref_out)  # same ops in the same order
    for got, ref in zip(grads, ref_grads, strict=True):
        _close(got, ref, rtol)


@pytest.mark.parametrize(
    "dtype, amp, rtol",
    [(torch.float32, False, 1e-5), (torch.float32, True, 2e-2), (torch.bfloat16, False, 2e-2)],
)
def test_swiglu_down_equals_plain_autograd(dtype: torch.dtype, amp: bool, rtol: float) -> None:
    inputs = _mlp_inputs(dtype)
    if amp:  # as under autocast: gate and up come out of bf16 matmuls, the weight is fp32
        inputs = [inputs[0].bfloat16(), inputs[1].bfloat16(), inputs[2]]
    ref_out, ref_grads = _run(_plain_swiglu_down, inputs, amp)
    out, grads = _run(swiglu_down, inputs, amp)
    assert torch.equal(out, ref_out)
    for got, ref in zip(grads, ref_grads, strict=True):
        _close(got, ref, rtol)


def test_gradients_pass_gradcheck_in_fp64() -> None:
    x, w = (t.double().requires_grad_() for t in _norm_inputs(torch.float32, torch.float32))
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, EPS), (x[:1, :2], w))
    gate, up, down = (t.double().requires_grad_() for t in _mlp_inputs(torch.float32))
    assert torch.autograd.gradcheck(swiglu_down, (gate[:1, :3], up[:1, :3], down))


def test_frozen_weights_get_no_gradient_and_inputs_still_do() -> None:
    x, w = _norm_inputs(torch.float32, torch.float32)
    x.requires_grad_()
    rms_norm(x, w, EPS).sum().backward()
    assert x.grad is not None and w.grad is None
    gate, up, down = _mlp_inputs(torch.float32)
    gate.requires_grad_()
    swiglu_down(gate, up, down).sum().backward()
    assert gate.grad is not None and up.grad is None and down.grad is None


def _saved_bytes(fn, *inputs: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(storages.values())


def test_modules_save_only_their_inputs() -> None:
    """The norm keeps x (+ 1/rms per token); the MLP keeps its input, gate and up (+ weights)."""
    cfg = ModelConfig(vocab_size=32, d_model=64, num_heads=4, num_kv_heads=2, d_ff=176)
    x = torch.randn(2, 10, 64, requires_grad=True)
    norm, mlp = RMSNorm(64, EPS), MLP(cfg)
    n = x.numel() * 4
    assert _saved_bytes(norm, x) == n + 64 * 4 + 20 * 4
    weights = sum(p.numel() * 4 for p in mlp.parameters())
    assert _saved_bytes(mlp, x) == n + 2 * 20 * 176 * 4 + weights


def test_no_grad_takes_the_module_path() -> None:
    """Without gradients nothing is saved and down_proj runs as a module (its decode path)."""
    cfg = ModelConfig(vocab_size=32, d_model=64, num_heads=4, num_kv_heads=2, d_ff=176)
    mlp = MLP(cfg)
    calls: list[int] = []
    mlp.down_proj.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        y = mlp(x)
    assert calls == [1]
    ref = _plain_swiglu_down(mlp.gate_proj(x), mlp.up_proj(x), mlp.down_proj.weight)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-7)
