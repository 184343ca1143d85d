"""ModelConfig: the shape of a LLaMA-family decoder, and the paper presets lmforge reproduces."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from lmforge.ranges import check_ranges

AttentionImpl = Literal["auto", "dense", "split", "flex"]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int = 4096
    """Rows of the embedding and of the output head; set to the tokenizer's size."""
    num_layers: int = 4
    """Transformer blocks."""
    d_model: int = 256
    """Residual stream width."""
    num_heads: int = 4
    """Query heads; head_dim = d_model / num_heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); equal to num_heads for plain MHA."""
    d_ff: int = 704
    """Hidden width of the SwiGLU MLP."""
    rope_theta: float = 10_000.0
    """RoPE base frequency; raised for context extension (Adjusted Base Frequency)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections are scaled by 1/sqrt(2*num_layers)."""
    attention: AttentionImpl = "auto"
    """Document-masked attention kernel: dense bool mask, per-document SDPA split, flex_attention
    block mask (CUDA; forward-only on CPU), or auto by T and device (model/attention.py)."""

    def __post_init__(self) -> None:
        check_ranges(
            self,
            positive=("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "d_ff"),
        )
        check_ranges(self, positive=("rope_theta", "norm_eps", "init_std"))
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count, computed from the shape (no model needed)."""
        d, kv = self.d_model, self.num_kv_heads * self.head_dim
        attn = 2 * d * d + 2 * d * kv
        block = attn + 3 * d * self.d_ff + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        embed = self.vocab_size * d if embeddings else 0
        return self.num_layers * block + d + head + embed

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, 6N + 12·L·d·T (PaLM, Chowdhery et al. 2022, appendix B).

        N counts the matmul weights (blocks and output head, not the input embedding).
        """
        n = self.num_params(embeddings=False)
        if self.tie_embeddings:
            n += self.vocab_size * self.d_model
        return 6.0 * n + 12.0 * self.num_layers * self.d_model * seq_len


# Shapes from the reports (see DESIGN.md §1). Vocab sizes are the reports' tokenizers.
PRESETS: dict[str, ModelConfig] = {
    # ChuXin-1.6B (arXiv 2405.04828): LLaMA2 shape, 24 x 2048, d_ff 5632, 32 heads, vocab 102,400.
    "chuxin-1.6b": ModelConfig(
        vocab_size=102_400, num_layers=24, d_model=2048, num_heads=32, num_kv_heads=32, d_ff=5632
    ),
    # Xmodel-LM-1.1B (arXiv 2406.02856): 24 x 2048, d_ff 5632, GQA 32 / 4 heads, vocab 32,000.
    "xmodel-lm-1.1b": ModelConfig(
        vocab_size=32_000, num_layers=24, d_model=2048, num_heads=32, num_kv_heads=4, d_ff=5632
    ),
    # XGen-7B (arXiv 2309.03450): LLaMA-7B shape with a 51,200-token vocabulary.
    "xgen-7b": ModelConfig(
        vocab_size=51_200, num_layers=32, d_model=4096, num_heads=32, num_kv_heads=32, d_ff=11008
    ),
    # LLaMA-2-7B (arXiv 2307.09288).
    "llama2-7b": ModelConfig(
        vocab_size=32_000, num_layers=32, d_model=4096, num_heads=32, num_kv_heads=32, d_ff=11008
    ),
}


def preset(name: str, **overrides: object) -> ModelConfig:
    """A named paper shape, optionally with fields replaced (e.g. a different vocab_size)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)  # type: ignore[arg-type]
