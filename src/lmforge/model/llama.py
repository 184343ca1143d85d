"""The LLaMA-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Pure torch: no optimizer, no distribution, no I/O. Submodule names follow HF `LlamaForCausalLM`
(`embed_tokens`, `layers.N.self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, `norm`,
`lm_head`) so exporting is a prefix rename.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.attention import Attention, DocumentMask, KVCache, plan_document_mask
from lmforge.model.config import ModelConfig
from lmforge.model.fused import rms_norm, swiglu_down
from lmforge.model.linear import Linear
from lmforge.model.loss import linear_cross_entropy
from lmforge.model.rope import compute_dtype, rope_cos_sin


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 like HF Llama."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)).

    Training calls down_proj's weight through `swiglu_down`, which keeps gate and up for the
    backward rather than four d_ff-wide tensors (model/fused.py); without gradients down_proj
    runs as a module (its one-token decode path)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.d_model, cfg.d_ff)
        self.up_proj = Linear(cfg.d_model, cfg.d_ff)
        self.down_proj = Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled():
            return swiglu_down(gate, up, self.down_proj.weight)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: DocumentMask | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual outputs scaled by 1/sqrt(2L) (GPT-2)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.num_layers))
            else:
                nn.init.normal_(p, std=std)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_chunk_tokens: int = 0,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T); with labels (B, T), the summed fp32
        cross-entropy instead (-100 ignored), fused with its gradient `loss_chunk_tokens` tokens
        at a time so full logits never exist (0: one piece; model/loss.py).

        positions (B, T): per-token positions restarting at 0 at each document start; they set
        RoPE and the document mask. None means one document per row (plain causal). With a
        cache, positions continue from the cached prefix, or from each row's start in a
        left-padded cache (`KVCache.starts`), which also masks the padding. attention_mask
        (B, 1, T, T), True where a token may attend, replaces the mask derived from positions
        (scoring uses it for tree-shaped rows: several continuations after one shared context).
        """
        hidden = self.hidden_states(input_ids, positions, cache, attention_mask)
        if labels is None:
            return self.lm_head(hidden)
        return linear_cross_entropy(hidden, self.lm_head.weight, labels, loss_chunk_tokens)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final normed hidden states (B, T, d_model), before the output head."""
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)  # (B, T, d)
        dtype = compute_dtype(x)  # what attention computes in
        mask = None
        if attention_mask is not None:
            if positions is None or cache is not None:
                raise ValueError("attention_mask needs explicit positions and no KV cache")
            mask = DocumentMask(dense=attention_mask)
        elif positions is not None and cache is None:
            mask = plan_document_mask(positions, self.cfg.attention, dtype)
        elif cache is not None and cache.starts is not None:
            if positions is not None:
                raise ValueError("a left-padded KV cache sets the positions itself; pass None")
            positions, padding = cache.left_padding(T)
            mask = DocumentMask(dense=padding)
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        # in q's dtype once, not in each block: there every q and k saved its own casts for the
        # backward (8·head_dim bytes per token and block in bf16)
        cos, sin = cos.to(dtype), sin.to(dtype)
        for block in self.layers:
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.norm(x)
