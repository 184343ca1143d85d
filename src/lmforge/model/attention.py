"""Grouped-query attention with document masking derived from per-token positions.

A packed row holds several documents; positions restart at 0 where each document starts, and
that one tensor drives both RoPE and the mask: a token attends causally within its own document
and never across. Three kernels, chosen by `ModelConfig.attention` ("auto": dense up to
DENSE_MAX_SEQ_LEN, on CPU 256 in fp32 and 512 in bf16; above it flex on CUDA and split
elsewhere):

- "dense": one SDPA call with a (B, 1, T, T) boolean mask. Simple and fast at small T, but the
  mask and the work grow with T².
- "split": one causal SDPA per run of consecutive equal-length documents, on views of q/k/v
  (no gather, no padding): a run of n documents of length L is viewed as a batch of n
  sequences. Memory O(T), work Σ doc_len². On CPU it measured within 1.16x of the documents
  run unpacked, while gathering documents into padded length buckets was slower (the copies
  cost more than the saved calls; benchmarks/RESULTS.md).
- "flex": `flex_attention` with a BlockMask of 128×128 tiles, built from each tile's first and
  last document (O(B·(T/128)²) memory; `create_block_mask` would evaluate the full (T, T)
  mask), and no host sync. On CUDA it runs `torch.compile`d: fused, memory O(T), work
  Σ doc_len² rounded up to tiles. Elsewhere flex runs unfused, materializing the scores, and
  torch (2.13) has no flex backward on CPU, compiled or not: inputs that require grad raise
  before the forward. So on CPU flex serves forward-only (eval, checking against dense), and
  training with it raises a ValueError instead of falling back to split: an explicit kernel
  choice is honoured or refused, never swapped silently (a benchmark labelled flex would
  measure split); "auto" is the setting that works on both.
Split plans plain causal SDPA when every row is a single document (flex and dense keep a mask).
Under torch.compile the split kernel runs eagerly between compiled pieces: its per-run sizes
differ from batch to batch, and traced they would recompile the graph for every layout.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from lmforge.model.config import AttentionImpl, ModelConfig
from lmforge.model.linear import Linear
from lmforge.model.rope import apply_rope

DENSE_MAX_SEQ_LEN = 1024
"""`attention="auto"` uses the dense mask up to this T, the flex or split kernel above it."""
DENSE_MAX_SEQ_LEN_CPU = 256
"""The same on CPU, where split's forward + backward measured 0.27-0.90x dense's time at T = 512
and 1024 (document lengths 16 to whole rows) and on par at 256 (benchmarks/notes/training.md).
Compiled, split and dense steps took the same time at T = 512 (2.61 vs 2.63 s)."""
DENSE_MAX_SEQ_LEN_CPU_BF16 = 512
"""The same on CPU in bf16, where split's SDPA calls (one per run of documents) took longer in
all than one dense call per layer: on an AMX Xeon a reference bf16 step with dense masks at
T = 512 took 0.90-0.93x the split kernel's time in three runs (fp32 level there;
benchmarks/RESULTS.md)."""

FLEX_BLOCK_SIZE = 128
"""Tile of the flex BlockMask (torch's default): tiles wholly masked out are skipped."""


class KVCache:
    """Preallocated keys/values for incremental decoding: per layer, (B, KV heads, max_len, D).

    Rows of different prompt lengths share one cache left-padded: every row writes its next token
    at slot `length`, and row b's own tokens start at slot starts[b] (its prompt right-aligned
    to the longest). `hidden_states` turns starts into each row's positions and a mask that hides
    the padding (`left_padding`).

    One tensor per layer, not one for all: with a single (layers, B, ...) tensor, a compiled
    decode step whose batch size was dynamic rewrote the whole cache at every layer instead of
    writing one slot, and decoded 8 rows 2.8x slower (benchmarks/notes/decode.md §10)."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        starts: torch.Tensor | None = None,
    ) -> None:
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.length = 0
        """Tokens already stored; the next call writes at this position."""
        if starts is not None and starts.shape != (batch_size,):
            raise ValueError(f"KVCache: starts must have shape ({batch_size},), got {starts.shape}")
        self.starts = starts
        """(B,) first slot of each row's own tokens (left padding before it); None: no padding."""

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store k, v (B, Hkv, T, D) after the cached prefix; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def copy_in(
        self, rows: slice, at: int, source: KVCache, source_rows: slice, slots: slice
    ) -> None:
        """Copy `source`'s `slots` of `source_rows` into `rows` here, from slot `at` on, in
        every layer; one source row fills as many rows as `rows` names."""
        for mine, theirs in ((self.k, source.k), (self.v, source.v)):
            for dst, src in zip(mine, theirs, strict=True):
                part = src[source_rows, :, slots]
                dst[rows, :, at : at + part.shape[2]] = part

    def left_padding(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (B, T) and attention mask (B, 1, T, length + T) of the next T tokens.

        A token sees its own row's tokens up to itself. A padding token sees only itself, so
        no query is left with nothing to see: that is NaN in some attention kernels, and NaN
        keys/values would reach real tokens through the 0 weight of a masked score."""
        if self.starts is None:
            raise ValueError("KVCache.left_padding: this cache has no starts (no padding)")
        device = self.starts.device
        slots = torch.arange(self.length, self.length + T, device=device)  # (T,)
        keys = torch.arange(self.length + T, device=device)  # (S,)
        starts = self.starts[:, None, None]  # (B, 1, 1)
        causal = keys <= slots[:, None]  # (T, S)
        own = (keys >= starts) | (keys == slots[:, None])  # (B, T, S)
        positions = (slots - self.starts[:, None]).clamp(min=0)
        return positions, (causal & own)[:, None]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (indices), in this order: drops finished sequences."""
        self.k, self.v = [k[rows] for k in self.k], [v[rows] for v in self.v]
        if self.starts is not None:
            self.starts = self.starts[rows]


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


def document_block_mask(positions: torch.Tensor, block: int = FLEX_BLOCK_SIZE) -> BlockMask:
    """(B, T) positions → flex BlockMask of the same mask as `document_mask`.

    Document ids never decrease along a row, so a query tile i sees key tile j ≤ i iff the last
    document of j reaches the first document of i, and sees all of it iff j < i and both lie in
    one document. Tiles are classified as `create_block_mask` does (a last, padded tile is never
    full), from 2·T/block ids instead of the T² mask it evaluates."""
    B, T = positions.shape
    doc = (positions == 0).cumsum(dim=-1)  # (B, T); a row's first segment is its own even mid-doc
    starts = torch.arange(0, T, block, device=positions.device)
    first, last = doc[:, starts], doc[:, (starts + block).clamp(max=T) - 1]  # (B, n) per tile
    i, j = starts[:, None], starts[None, :]
    some = (j <= i) & (last[:, None, :] >= first[:, :, None])  # (B, n q-tiles, n kv-tiles)
    whole = (j < i) & (first[:, None, :] == last[:, :, None])
    if T % block:
        whole[:, -1] = False
    partial = some & ~whole

    def ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n, n) bool → per q-tile count (B, 1, n) and kv-tile indices, present ones first."""
        counts = tiles.sum(dim=-1, dtype=torch.int32)[:, None]
        order = torch.argsort(tiles.to(torch.int32), dim=-1, descending=True, stable=True)
        return counts, order.to(torch.int32)[:, None]

    def same_document_causal(
        b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
    ) -> torch.Tensor:
        return (doc[b, q] == doc[b, kv]) & (q >= kv)

    return BlockMask.from_kv_blocks(
        *ordered(partial), *ordered(whole), block, same_document_causal, seq_lengths=(T, T)
    )


@functools.cache
def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """flex_attention compiled once (on first use): fused kernels, no (T, T) scores."""
    return torch.compile(flex_attention, dynamic=False)


def flex_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask
) -> torch.Tensor:
    """flex_attention over q (B, H, T, D), k/v (B, Hkv, T, D); compiled on CUDA only. Inside a
    compiled model it is called as it is, for that compile to lower it: calling our own
    compiled copy from there (a cached function dynamo must trace into) was where a compiled
    doc-masked step on an H200 failed in inductor's autotuning (benchmarks/RESULTS.md)."""
    if q.device.type == "cuda":
        if torch.compiler.is_compiling():
            return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
        return compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=True)
    if q.device.type == "cpu" and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise ValueError(
            "model.attention: flex has no backward on CPU (torch refuses it); train on CPU "
            "with attention auto or split, or run this forward under torch.no_grad()"
        )
    with warnings.catch_warnings():  # unfused is expected here: see the module docstring
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


@dataclass(frozen=True)
class Run:
    """`docs` consecutive documents of `length` tokens in batch row `row`."""

    row: int
    docs: int
    length: int


@dataclass(frozen=True)
class DocumentMask:
    """The document mask of one forward pass, planned once and shared by every layer: a dense
    (B, 1, T, T) mask, runs of equal-length documents (split kernel), a flex BlockMask, or none
    of them (one document per row: plain causal attention)."""

    dense: torch.Tensor | None = None
    runs: list[Run] = field(default_factory=list)
    flex: BlockMask | None = None
    causal: bool = True
    """No mask at all: always derived from the fields above, never taken from the caller. It is
    stored, not a property over `runs`, so compiled code reading it guards on one bool rather
    than on this batch's number of runs. It is an init field only because FSDP rebuilds
    dataclass inputs with dataclasses.replace, which refuses init=False fields."""

    def __post_init__(self) -> None:
        causal = self.dense is None and not self.runs and self.flex is None
        object.__setattr__(self, "causal", causal)


def plan_document_mask(
    positions: torch.Tensor, impl: AttentionImpl, dtype: torch.dtype = torch.float32
) -> DocumentMask:
    """Pick the kernel for this T and the dtype attention computes in (see module docstring),
    and precompute what it needs."""
    B, T = positions.shape
    dense_max = DENSE_MAX_SEQ_LEN
    if positions.device.type == "cpu":
        bf16 = dtype == torch.bfloat16
        dense_max = DENSE_MAX_SEQ_LEN_CPU_BF16 if bf16 else DENSE_MAX_SEQ_LEN_CPU
    if impl == "dense" or (impl == "auto" and T <= dense_max):
        return DocumentMask(dense=document_mask(positions))
    if impl == "flex" or (impl == "auto" and positions.device.type == "cuda"):
        return DocumentMask(flex=document_block_mask(positions))
    lengths = document_lengths(positions)
    if len(lengths) == B:  # every row is one document (or one piece of one)
        return DocumentMask()
    runs: list[Run] = []
    at = 0
    for n in lengths:
        row = at // T
        if runs and runs[-1].row == row and runs[-1].length == n:
            runs[-1] = Run(row, runs[-1].docs + 1, n)
        else:
            runs.append(Run(row, 1, n))
        at += n
    return DocumentMask(runs=runs)


def split_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: DocumentMask
) -> torch.Tensor:
    """Document-causal attention at O(T) memory: q (B, H, T, D), k/v (B, Hkv, T, D).

    The runs are cut with one `split` over the flattened tokens: slicing each run instead
    would make every slice's backward fill a gradient buffer of the full input size."""
    B, H, T, D = q.shape
    if not plan.runs:
        raise ValueError("split_attention needs a run plan (plan_document_mask)")
    sizes = [run.docs * run.length for run in plan.runs]

    def runs(x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (h, docs·length, D) views
        return x.transpose(0, 1).reshape(x.shape[1], B * T, D).split(sizes, dim=1)

    def docs(x: torch.Tensor, run: Run) -> torch.Tensor:  # (docs, h, length, D)
        if run.docs == 1:  # the batch stride of unsqueeze keeps SDPA on its fast path
            return x.unsqueeze(0)
        batch = x.unflatten(1, (run.docs, run.length)).transpose(0, 1)
        return batch.contiguous() if run.length < 256 else batch  # short: copying is cheaper

    outs = []
    for run, qr, kr, vr in zip(plan.runs, runs(q), runs(k), runs(v), strict=True):
        o = F.scaled_dot_product_attention(
            docs(qr, run), docs(kr, run), docs(vr, run), is_causal=True, enable_gqa=True
        )
        outs.append(o.transpose(0, 1).flatten(1, 2))  # (H, docs·length, D)
    return torch.cat(outs, dim=1).view(H, B, T, D).transpose(0, 1)


def _split_attention_outside_the_graph(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: DocumentMask
) -> torch.Tensor:
    """split_attention as compiled code calls it: disabled where dynamo meets it, so it runs
    eagerly between compiled pieces (module docstring). Disabling it here, not with a decorator,
    keeps `import torch._dynamo` (70 MB, 1.4 s) out of processes that never compile."""
    return torch.compiler.disable(split_attention)(q, k, v, plan)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        self.q_proj = Linear(cfg.d_model, cfg.d_model)
        self.k_proj = Linear(cfg.d_model, kv_dim)
        self.v_proj = Linear(cfg.d_model, kv_dim)
        self.o_proj = Linear(cfg.d_model, cfg.d_model)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: DocumentMask | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """mask None: plain causal over the row (or over the cache when one is given); with a
        cache, a dense mask is the left padding's (`KVCache.left_padding`)."""
        B, T, _ = x.shape
        H, Hkv, D = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer, k, v)
            if mask is not None and mask.dense is not None:  # left-padded rows (KVCache.starts)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=True)
            elif past == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            elif T == 1:  # one new token sees the whole cache: no mask to build
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            else:  # new tokens see the whole prefix and each other causally
                S = past + T
                seen = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=past)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=seen, enable_gqa=True)
        elif mask is None or mask.causal:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif mask.dense is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=True)
        elif mask.flex is not None:
            y = flex_document_attention(q, k, v, mask.flex)
        elif torch.compiler.is_compiling():
            y = _split_attention_outside_the_graph(q, k, v, mask)
        else:
            y = split_attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))
