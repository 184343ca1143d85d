"""Document masking: a packed row behaves exactly like its documents run one by one."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.model.attention import KVCache, document_lengths, document_mask
from lmforge.model.config import ModelConfig
from lmforge.model.llama import Llama

LENGTHS = [[7, 1, 12, 20, 8], [30, 18]]  # two rows of T = 48, a 1-token document included


def _packed(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (len(LENGTHS), sum(LENGTHS[0])), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS])
    return ids, pos


@pytest.mark.parametrize("impl", ["dense", "split"])
def test_packed_logits_equal_each_document_alone(tiny_cfg: ModelConfig, impl: str) -> None:
    torch.manual_seed(0)
    model = Llama(replace(tiny_cfg, attention=impl)).eval()
    ids, pos = _packed(tiny_cfg.vocab_size)
    packed = model(ids, pos)
    for b, row in enumerate(LENGTHS):
        alone = torch.cat([model(doc[None]) for doc in ids[b].split(row)], dim=1)[0]
        torch.testing.assert_close(packed[b], alone)


def test_masking_off_lets_documents_see_each_other(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = Llama(tiny_cfg).eval()
    ids, pos = _packed(tiny_cfg.vocab_size)
    masked, causal = model(ids, pos), model(ids)
    first = LENGTHS[0][0]
    torch.testing.assert_close(masked[:, :first], causal[:, :first])  # first document: same
    assert (masked[:, first:] - causal[:, first:]).abs().max() > 1e-3


def test_split_kernel_equals_dense_forward_and_backward(tiny_cfg: ModelConfig) -> None:
    ids, pos = _packed(tiny_cfg.vocab_size)
    grads = []
    for impl in ("dense", "split"):
        torch.manual_seed(0)
        model = Llama(replace(tiny_cfg, attention=impl))
        model(ids, pos).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_row_starting_mid_document_is_its_own_segment() -> None:
    pos = torch.tensor([[3, 4, 5, 0, 1], [0, 1, 0, 1, 2]])
    assert document_lengths(pos) == [3, 2, 2, 3]
    mask = document_mask(pos)[0, 0]
    assert mask[2, :3].all() and not mask[3, :3].any() and mask[4, 3:5].all()


def test_chunked_prefill_with_cache_equals_full_forward(tiny_cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = Llama(tiny_cfg).eval()
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 20))
    full = model(ids)
    cache = KVCache(tiny_cfg, batch_size=2, max_len=20, device="cpu", dtype=torch.float32)
    parts = [model(chunk, cache=cache) for chunk in ids.split([9, 1, 6, 4], dim=1)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full)
    assert cache.length == 20
    with pytest.raises(ValueError, match="KV cache full"):
        model(ids[:, :1], cache=cache)


def _dense_vs_split(lengths: list[list[int]], heads: tuple[int, int] = (4, 2)) -> None:
    """split_attention equals SDPA under the dense document mask, outputs and q/k/v grads."""
    import torch.nn.functional as F

    from lmforge.model.attention import plan_document_mask, split_attention

    T = sum(lengths[0])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    g = torch.Generator().manual_seed(len(lengths[0]))
    H, Hkv = heads
    shapes = [(len(lengths), H, T, 8), (len(lengths), Hkv, T, 8), (len(lengths), Hkv, T, 8)]
    q, k, v = (torch.randn(s, generator=g, requires_grad=True) for s in shapes)
    weight = torch.randn(len(lengths), H, T, 8, generator=g)
    results = []
    for impl in ("dense", "split"):
        plan = plan_document_mask(pos, impl)  # type: ignore[arg-type]
        if impl == "dense":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.dense, enable_gqa=True)
        elif plan.causal:  # one document per row
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = split_attention(q, k, v, plan)
        grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
        results.append((out, *grads))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=8), st.integers(0, 2))
def test_bucketed_split_kernel_equals_the_dense_mask(lengths: list[int], shift: int) -> None:
    second = lengths[shift % len(lengths) :] + lengths[: shift % len(lengths)]  # same T
    _dense_vs_split([lengths, second])


def test_equal_documents_share_a_call_and_single_documents_run_plain_causal() -> None:
    from lmforge.model.attention import Run, plan_document_mask

    assert plan_document_mask(torch.arange(2048).expand(2, 2048), "split").causal
    pos = torch.cat([torch.arange(100, 612), torch.arange(512), torch.arange(512)])[None]
    runs = plan_document_mask(torch.cat([pos, (torch.arange(1536) % 768)[None]]), "split").runs
    assert runs == [Run(0, 3, 512), Run(1, 2, 768)]  # a piece + 2 docs; 2 docs
    _dense_vs_split([[1000, 24, 1, 1023], [512, 512, 512, 512]])


@pytest.mark.parametrize("chunk", [0, 7, 16, 1000])
def test_chunked_cross_entropy_equals_full_logits(tiny_cfg: ModelConfig, chunk: int) -> None:
    """Loss and gradients of the chunked, recomputing loss equal plain full-logit CE."""
    import torch.nn.functional as F

    from lmforge.data.packing import IGNORE_INDEX

    assert IGNORE_INDEX == -100  # the model's loss ignores the packer's label
    ids, pos = _packed(tiny_cfg.vocab_size)
    labels = ids.roll(-1, dims=1)
    labels[:, ::5] = IGNORE_INDEX
    results = []
    for use_labels in (False, True):
        torch.manual_seed(0)
        model = Llama(tiny_cfg)
        if use_labels:
            loss = model(ids, pos, labels=labels, loss_chunk_tokens=chunk)
        else:
            logits = model(ids, pos).float()
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)
