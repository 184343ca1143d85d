"""Document masking: a packed row behaves exactly like its documents run one by one."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

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
