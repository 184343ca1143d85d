"""Document masking: a packed row behaves exactly like its documents run one by one."""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.model.attention import DocumentMask, KVCache, document_lengths, document_mask
from lmforge.model.config import ModelConfig
from lmforge.model.llama import Llama

LENGTHS = [[7, 1, 12, 20, 8], [30, 18]]  # two rows of T = 48, a 1-token document included


def _packed(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (len(LENGTHS), sum(LENGTHS[0])), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS])
    return ids, pos


@pytest.mark.parametrize("impl", ["dense", "split", "flex"])
@torch.no_grad()  # flex has no backward on CPU
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


def _positions(rows: list[list[tuple[int, int]]], device: str = "cpu") -> torch.Tensor:
    """Rows of (first position, length) segments → (B, T) positions."""
    return torch.stack(
        [torch.cat([torch.arange(a, a + n, device=device) for a, n in row]) for row in rows]
    )


FLEX_LAYOUTS = [  # (first position, length): a first position > 0 is a row starting mid-document
    [[(0, 300), (0, 1), (0, 211)], [(40, 100), (0, 412)]],  # T = 512: tiles cut documents
    [[(0, 128), (0, 128), (0, 256)], [(5, 512)]],  # tile-aligned documents; one piece of one
    [[(7, 1000), (0, 24), (0, 1), (0, 255)]],  # T = 1280, docs across many tiles
    [[(0, 30), (0, 47)], [(0, 77)], [(9, 60), (0, 17)]],  # T = 77: one partial tile
]


def _dense_vs_flex(rows: list[list[tuple[int, int]]], heads: tuple[int, int], device: str) -> None:
    """flex_document_attention equals SDPA under the dense document mask; with grads on CUDA."""
    import torch.nn.functional as F

    from lmforge.model.attention import flex_document_attention, plan_document_mask

    pos = _positions(rows, device)
    (B, T), (H, Hkv) = pos.shape, heads
    g = torch.Generator(device).manual_seed(T)
    grads = device == "cuda"
    shapes = [(B, H, T, 16), (B, Hkv, T, 16), (B, Hkv, T, 16)]
    q, k, v = (torch.randn(s, generator=g, device=device, requires_grad=grads) for s in shapes)
    flex = plan_document_mask(pos, "flex").flex
    assert flex is not None
    outs = [
        F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(pos), enable_gqa=True),
        flex_document_attention(q, k, v, flex),
    ]
    tol = 2e-3 if grads else 1e-5  # CUDA: the fused kernel may use TF32 matmuls
    torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)
    if grads:
        weight = torch.randn(outs[0].shape, generator=g, device=device)
        dense, fused = (torch.autograd.grad((o * weight).sum(), (q, k, v)) for o in outs)
        for a, b in zip(fused, dense, strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("rows", FLEX_LAYOUTS)
def test_flex_block_mask_equals_create_block_mask(rows: list[list[tuple[int, int]]]) -> None:
    """The tiles classified from document ranges equal those create_block_mask finds in the
    full (T, T) mask: partial and full, by query and by key tile."""
    from torch.nn.attention.flex_attention import create_block_mask

    from lmforge.model.attention import document_block_mask

    pos = _positions(rows)
    (B, T), doc = pos.shape, (pos == 0).cumsum(dim=-1)

    def mask_mod(
        b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
    ) -> torch.Tensor:
        return (doc[b, q] == doc[b, kv]) & (q >= kv)

    ours, ref = document_block_mask(pos), create_block_mask(mask_mod, B, None, T, T, "cpu")
    for name in ("kv_num_blocks", "kv_indices", "q_num_blocks", "q_indices"):
        for prefix in ("", "full_"):
            torch.testing.assert_close(getattr(ours, prefix + name), getattr(ref, prefix + name))
    assert ours.seq_lengths == ref.seq_lengths == (T, T)


@pytest.mark.parametrize("heads", [(4, 2), (4, 1)])
def test_flex_kernel_forward_equals_the_dense_mask(heads: tuple[int, int]) -> None:
    for rows in FLEX_LAYOUTS:
        _dense_vs_flex(rows, heads, "cpu")


def test_the_model_plans_its_mask_for_the_dtype_attention_computes_in(
    tiny_cfg: ModelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmforge.model import llama

    seen: list[torch.dtype] = []

    def plan(positions: torch.Tensor, impl: str, dtype: torch.dtype) -> DocumentMask:
        seen.append(dtype)
        return DocumentMask(dense=document_mask(positions))

    monkeypatch.setattr(llama, "plan_document_mask", plan)
    model = Llama(tiny_cfg)
    ids, positions = _packed(tiny_cfg.vocab_size)
    model(ids, positions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, positions)
    model.to(torch.bfloat16)(ids, positions)
    assert seen == [torch.float32, torch.bfloat16, torch.bfloat16]


def test_auto_keeps_split_on_cpu_and_flex_refuses_cpu_training(tiny_cfg: ModelConfig) -> None:
    from lmforge.model.attention import plan_document_mask

    pos = (torch.arange(2048) % 512)[None]
    auto = plan_document_mask(pos, "auto")
    assert auto.flex is None and len(auto.runs) == 1
    short = (torch.arange(512) % 100)[None]  # on CPU split wins from T = 512, dense up to 256
    assert len(plan_document_mask(short, "auto").runs) == 2  # 5 x 100 tokens, then 12
    assert plan_document_mask(short[:, :256], "auto").dense is not None
    bf16 = torch.bfloat16  # its SDPA costs more per call: dense up to 512
    assert plan_document_mask(short, "auto", bf16).dense is not None
    assert plan_document_mask(pos[:, :1024], "auto", bf16).dense is None
    assert not plan_document_mask(pos, "flex").causal
    split = plan_document_mask(short, "auto")
    assert not split.causal and not replace(split).causal  # FSDP rebuilds inputs with replace
    assert not DocumentMask(runs=split.runs, causal=True).causal  # derived, never taken
    model = Llama(replace(tiny_cfg, attention="flex"))
    with pytest.raises(ValueError, match="flex has no backward on CPU"):
        model(*_packed(tiny_cfg.vocab_size))


def test_compiled_split_kernel_reuses_its_graphs_for_new_layouts(tiny_cfg: ModelConfig) -> None:
    """Each batch packs documents differently; the split kernel runs outside the compiled graph,
    so new layouts reuse the graphs (they used to add one each) and match eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Llama(replace(tiny_cfg, attention="split", num_layers=1))
    compiled = torch.compile(model)
    g, rng = torch.Generator().manual_seed(1), random.Random(1)

    def step() -> None:
        lengths: list[int] = []
        while sum(lengths) < 96:
            lengths.append(min(rng.randint(3, 40), 96 - sum(lengths)))
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        ids = torch.randint(0, tiny_cfg.vocab_size, (1, 96), generator=g)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, pos), model(ids, pos))

    for _ in range(3):  # the first compile, and one more once shapes are marked dynamic
        step()
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(4):
        step()
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled flex_attention is CUDA-only")
def test_flex_on_cuda_equals_the_dense_mask_and_runs_32k_in_bounded_memory() -> None:
    """auto picks flex on CUDA; forward + backward at T = 32768 stays far below the 4 GiB of
    one fp32 (T, T) score matrix."""
    from lmforge.model.attention import flex_document_attention, plan_document_mask

    for rows in FLEX_LAYOUTS[:2]:
        _dense_vs_flex(rows, (4, 2), "cuda")
    pos = _positions([[(0, 1023), *[(0, 512)] * 62, (0, 1)]], "cuda")
    qkv = [torch.randn(1, 2, 32768, 16, device="cuda", requires_grad=True) for _ in range(3)]
    for _ in range(2):  # the first call compiles for this shape
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        plan = plan_document_mask(pos, "auto")
        assert plan.flex is not None
        flex_document_attention(*qkv, plan.flex).square().sum().backward()
        assert torch.cuda.max_memory_allocated() - base < 256 * 2**20


SPLIT_32K = """
import resource, torch
from lmforge.model.attention import plan_document_mask, split_attention
lengths = [1023] + [512] * 62 + [1]  # T = 32768
pos = torch.cat([torch.arange(n) for n in lengths])[None]
q, k, v = (torch.randn(1, 2, 32768, 16, requires_grad=True) for _ in range(3))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
split_attention(q, k, v, plan_document_mask(pos, "split")).square().sum().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.multiproc
def test_split_attention_at_32k_runs_in_bounded_memory() -> None:
    """Forward + backward at T = 32768 in a fresh process: peak RSS grows by ~40 MiB (measured),
    asserted < 256 MiB, where one (T, T) bool mask alone is 1 GiB and fp32 scores 4 GiB."""
    out = subprocess.run(
        [sys.executable, "-c", SPLIT_32K], capture_output=True, text=True, check=True
    )
    grown_kib = int(out.stdout.split()[-1])  # ru_maxrss is KiB on Linux
    assert grown_kib < 256 * 1024, f"peak RSS grew {grown_kib / 1024:.0f} MiB"


@pytest.mark.parametrize("chunk", [0, 7, 16, 1000])
def test_chunked_cross_entropy_equals_full_logits(tiny_cfg: ModelConfig, chunk: int) -> None:
    """Loss and gradients of the model's chunked, fused loss equal plain full-logit CE."""
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
