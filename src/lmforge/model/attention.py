"""Grouped-query attention with document masking derived from per-token positions.

A packed row holds several documents; positions restart at 0 where each document starts, and
that one tensor drives both RoPE and the mask: a token attends causally within its own document
and never across. Two kernels, chosen by `ModelConfig.attention`:

- "dense": one SDPA call with a (B, 1, T, T) boolean mask. Simple and fast at small T, but the
  mask and the work grow with T².
- "split": sort the documents of the batch by length, run one causal SDPA per distinct length
  over all documents of that length, then undo the sort. Memory O(T), work O(Σ doc_len²).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import AttentionImpl, ModelConfig
from lmforge.model.rope import apply_rope

DENSE_MAX_SEQ_LEN = 1024
"""`attention="auto"` uses the dense mask up to this T, the split kernel above it."""


class KVCache:
    """Preallocated keys/values for incremental decoding: (layers, B, KV heads, max_len, D)."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        """Tokens already stored; the next call writes at this position."""

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store k, v (B, Hkv, T, D) after the cached prefix; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """(B, T) positions → (B, 1, T, T) bool: causal and within the same document."""
    doc = (positions == 0).cumsum(dim=-1)  # (B, T) document index per token
    T = positions.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


def document_lengths(positions: torch.Tensor) -> list[int]:
    """Lengths of the documents in a (B, T) batch, row after row (flattened order)."""
    starts = positions == 0
    starts[:, 0] = True  # a row always starts a segment, even mid-document
    idx = starts.flatten().nonzero().flatten().tolist()
    idx.append(positions.numel())
    return [b - a for a, b in zip(idx[:-1], idx[1:], strict=True)]


@dataclass(frozen=True)
class DocumentMask:
    """The document mask of one forward pass, planned once and shared by every layer.

    Either `dense` (B, 1, T, T) is set, or the split plan: `perm` orders the B*T tokens by the
    length of their document, `sizes` is the token count of each group of equal-length
    documents and `groups` its (documents, length).
    """

    dense: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    sizes: list[int] = field(default_factory=list)
    groups: list[tuple[int, int]] = field(default_factory=list)


def plan_document_mask(positions: torch.Tensor, impl: AttentionImpl) -> DocumentMask:
    """Pick the kernel for this T (see module docstring) and precompute what it needs."""
    T = positions.shape[-1]
    if impl == "dense" or (impl == "auto" and T <= DENSE_MAX_SEQ_LEN):
        return DocumentMask(dense=document_mask(positions))
    lengths = document_lengths(positions)
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    perm = torch.cat([torch.arange(starts[i], starts[i] + lengths[i]) for i in order])
    sizes, groups = _runs([lengths[i] for i in order])
    return DocumentMask(perm=perm.to(positions.device), sizes=sizes, groups=groups)


def split_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: DocumentMask
) -> torch.Tensor:
    """Document-causal attention at O(T) memory: q (B, H, T, D), k/v (B, Hkv, T, D)."""
    B, H, T, D = q.shape
    perm = plan.perm
    if perm is None:
        raise ValueError("split_attention needs a split plan (plan_document_mask)")

    def flat(x: torch.Tensor) -> torch.Tensor:  # (B, h, T, D) → (B*T, h, D), sorted by doc length
        return x.transpose(1, 2).reshape(B * T, x.shape[1], D).index_select(0, perm)

    qs, ks, vs = flat(q), flat(k), flat(v)
    outs = []
    chunks = zip(qs.split(plan.sizes), ks.split(plan.sizes), vs.split(plan.sizes), strict=True)
    for (qc, kc, vc), (n, L) in zip(chunks, plan.groups, strict=True):
        qc, kc, vc = (x.view(n, L, x.shape[1], D).transpose(1, 2) for x in (qc, kc, vc))
        o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=True)
        outs.append(o.transpose(1, 2).reshape(n * L, H, D))
    out = torch.empty_like(qs).index_copy(0, perm, torch.cat(outs))  # undo the sort
    return out.view(B, T, H, D).transpose(1, 2)


def _runs(sorted_lengths: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Group equal lengths: token count per group, and (documents, length) per group."""
    sizes: list[int] = []
    counts: list[tuple[int, int]] = []
    for L in sorted_lengths:
        if counts and counts[-1][1] == L:
            counts[-1] = (counts[-1][0] + 1, L)
            sizes[-1] += L
        else:
            counts.append((1, L))
            sizes.append(L)
    return sizes, counts


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: DocumentMask | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """mask None: plain causal over the row (or over the cache when one is given)."""
        B, T, _ = x.shape
        H, Hkv, D = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer, k, v)
            if past == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:  # new tokens see the whole prefix and each other causally
                S = past + T
                seen = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=past)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=seen, enable_gqa=True)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif mask.dense is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=True)
        else:
            y = split_attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))
