"""The fused, chunked head cross-entropy computes the plain full-logit loss and its gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.loss import IGNORE_INDEX, linear_cross_entropy

VOCAB, D = 97, 24


def _inputs(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, n // 2, D, generator=g)
    weight = torch.randn(VOCAB, D, generator=g) * 0.3
    labels = torch.randint(0, VOCAB, (2, n // 2), generator=g)
    labels[0, ::3] = IGNORE_INDEX
    labels[1, :8] = IGNORE_INDEX  # a whole chunk of 7 ignored
    return hidden, weight, labels


def _plain(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float().flatten(0, 1)
    return F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def _loss_and_grads(fn, hidden, weight, labels, scale: float = 1.0):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, labels)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [0, 1, 7, 16, 40, 1000])
def test_fp32_loss_and_gradients_equal_the_plain_loss(chunk: int) -> None:
    hidden, weight, labels = _inputs()
    ref = _loss_and_grads(_plain, hidden, weight, labels, scale=0.25)
    got = _loss_and_grads(
        lambda h, w, y: linear_cross_entropy(h, w, y, chunk), hidden, weight, labels, scale=0.25
    )
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_matches_the_plain_loss_under_autocast() -> None:
    hidden, weight, labels = _inputs(seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _loss_and_grads(_plain, hidden, weight, labels)
        got = _loss_and_grads(
            lambda h, w, y: linear_cross_entropy(h, w, y, 7), hidden, weight, labels
        )
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(got[1:], ref[1:], strict=True):  # bf16 matmuls: a few bf16 ulps apart
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_bf16_weights_without_autocast_get_bf16_gradients() -> None:
    """FSDP's bf16 param_dtype hands the loss bf16 weights and hidden states."""
    hidden, weight, labels = _inputs(seed=2)
    ref = _loss_and_grads(_plain, hidden.bfloat16(), weight.bfloat16(), labels)
    got = _loss_and_grads(
        lambda h, w, y: linear_cross_entropy(h, w, y, 16),
        hidden.bfloat16(),
        weight.bfloat16(),
        labels,
    )
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(got[1:], ref[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_all_ignored_gives_zero_loss_and_zero_gradients() -> None:
    hidden, weight, labels = _inputs()
    loss, grad_h, grad_w = _loss_and_grads(
        lambda h, w, y: linear_cross_entropy(h, w, y, 7),
        hidden,
        weight,
        torch.full_like(labels, IGNORE_INDEX),
    )
    assert loss.item() == 0.0
    assert not grad_h.any() and not grad_w.any()


def test_without_gradients_only_the_loss_is_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmforge.model import loss as loss_module

    hidden, weight, labels = _inputs()
    weight.requires_grad_()
    chunked = loss_module._chunked
    calls: list[bool] = []

    def spy(*args, want_grad: bool):
        calls.append(want_grad)
        return chunked(*args, want_grad=want_grad)

    monkeypatch.setattr(loss_module, "_chunked", spy)
    with torch.no_grad():  # eval under no_grad: no gradient work although weight requires grad
        loss = linear_cross_entropy(hidden, weight, labels, 7)
    torch.testing.assert_close(loss, _plain(hidden, weight, labels), rtol=1e-5, atol=1e-5)
    assert not loss.requires_grad and calls == [False]


def test_compiled_loss_matches_eager() -> None:
    hidden, weight, labels = _inputs(seed=3)
    eager = _loss_and_grads(
        lambda h, w, y: linear_cross_entropy(h, w, y, 16), hidden, weight, labels
    )
    compiled_fn = torch.compile(linear_cross_entropy)
    compiled = _loss_and_grads(lambda h, w, y: compiled_fn(h, w, y, 16), hidden, weight, labels)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_second_backward_is_refused_not_wrong() -> None:
    hidden, weight, labels = _inputs()
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, labels, 7)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    torch.testing.assert_close(h.grad, first)
