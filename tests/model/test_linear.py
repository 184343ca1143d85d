"""The few-token paths of model.linear.Linear (matrix-vector for one token, weight @ x.T up to
SMALL_ROWS) compute nn.Linear's function."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.linear import SMALL_ROWS, Linear


def test_one_token_matches_the_matrix_path_values_shapes_and_gradients() -> None:
    torch.manual_seed(0)
    layer = Linear(48, 80)
    for shape in [(48,), (1, 48), (1, 1, 48)]:
        x = torch.randn(shape, requires_grad=True)
        fast = layer(x)
        ref = F.linear(x, layer.weight)
        assert fast.shape == ref.shape
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
        (g_fast,) = torch.autograd.grad(fast.square().sum(), layer.weight)
        (g_ref,) = torch.autograd.grad(ref.square().sum(), layer.weight)
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-6)
    x = torch.randn(SMALL_ROWS + 1, 48)
    assert torch.equal(layer(x), F.linear(x, layer.weight))  # many tokens: nn.Linear
    assert list(layer.state_dict()) == ["weight"]  # the keys checkpoints and export expect


@pytest.mark.parametrize("shape", [(2, 48), (3, 5, 48), (SMALL_ROWS, 1, 48), (4, 1, 48)])
def test_a_few_tokens_match_the_matrix_path_in_row_order(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer = Linear(48, 80)
    x = torch.randn(shape, requires_grad=True)
    fast = layer(x)
    ref = F.linear(x, layer.weight)
    assert fast.shape == ref.shape and fast.is_contiguous()  # views downstream rely on it
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    g_fast = torch.autograd.grad(fast.square().sum(), (x, layer.weight))
    g_ref = torch.autograd.grad(ref.square().sum(), (x, layer.weight))
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-5)
    strided = torch.randn(48, 3).t()  # a transposed input: reshape copies it to row order
    torch.testing.assert_close(layer(strided), F.linear(strided, layer.weight))


def test_autocast_keeps_the_matrix_path_and_bf16_weights_take_mv_where_native(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lmforge.model.linear as linear

    torch.manual_seed(0)
    layer = Linear(32, 16)
    x = torch.randn(1, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref = F.linear(x, layer.weight)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
    real_mv, calls = torch.mv, []
    monkeypatch.setattr(torch, "mv", lambda *a: calls.append(a) or real_mv(*a))
    monkeypatch.setattr(linear, "BF16_MV_FOR_ONE_ROW", False)  # bf16 emulated: F.linear
    layer.to(torch.bfloat16)
    assert torch.equal(layer(x.bfloat16()), F.linear(x.bfloat16(), layer.weight)) and not calls
    monkeypatch.setattr(linear, "BF16_MV_FOR_ONE_ROW", True)  # AVX512-BF16: mv
    fast = layer(x.bfloat16()[None])
    assert len(calls) == 1 and fast.shape == (1, 1, 16) and fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast[0], F.linear(x.bfloat16(), layer.weight))
    layer.float()(x)
    assert len(calls) == 2


def test_one_token_through_onednn_without_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """The AMD path (forced on here): oneDNN's product, only where no gradient can flow back
    through it (the op has no backward: it would pass wrong gradients silently)."""
    import lmforge.model.linear as linear

    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    monkeypatch.setattr(linear, "ONEDNN_FOR_ONE_ROW", True)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(
        torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a)
    )
    torch.manual_seed(0)
    layer = Linear(48, 80)
    x = torch.randn(1, 1, 48)
    with torch.no_grad():
        fast = layer(x)
    assert len(calls) == 1 and fast.shape == (1, 1, 80)
    torch.testing.assert_close(fast, F.linear(x, layer.weight), rtol=1e-5, atol=1e-6)
    layer(x).sum().backward()  # with gradients: sgemv
    assert len(calls) == 1
    torch.testing.assert_close(layer.weight.grad, x.reshape(1, 48).expand(80, 48))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_one_token_takes_the_matrix_vector_product(dtype: torch.dtype) -> None:
    """Under torch.compile one token takes mv in every dtype (inductor turns it into one pass
    over the weights) and computes F.linear's function; a few tokens keep the matrix path."""
    traced: list[set] = []

    def record(gm: torch.fx.GraphModule, _inputs: list) -> object:
        traced.append({node.target for node in gm.graph.nodes})
        return gm.forward

    torch.manual_seed(0)
    layer = Linear(48, 80).to(dtype)
    compiled = torch.compile(layer, backend=record, fullgraph=True)
    for x in (torch.randn(1, 1, 48, dtype=dtype), torch.randn(1, 48, dtype=dtype)):
        fast = compiled(x)
        ref = F.linear(x.float(), layer.weight.float()).to(dtype)
        assert fast.shape == ref.shape and fast.dtype == dtype
        torch.testing.assert_close(fast, ref)  # dtype-aware tolerances
    assert all(torch.mv in ops for ops in traced)
    compiled(torch.randn(3, 48, dtype=dtype))
    assert torch.mv not in traced[-1]
