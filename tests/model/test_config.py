"""Model presets have the reports' parameter counts; the count formula matches real modules."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lmforge.model.config import PRESETS, ModelConfig, preset
from lmforge.model.llama import Llama


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("chuxin-1.6b", 1.55e9, 1.70e9),  # ChuXin-1.6B
        ("xmodel-lm-1.1b", 1.05e9, 1.20e9),  # Xmodel-LM-1.1B
        ("xgen-7b", 6.7e9, 7.0e9),  # XGen-7B
        ("llama2-7b", 6.6e9, 6.8e9),  # LLaMA-2-7B: 6.74B
    ],
)
def test_preset_parameter_count_matches_the_paper(name: str, low: float, high: float) -> None:
    assert low <= PRESETS[name].num_params() <= high


@pytest.mark.parametrize("tie", [False, True])
def test_num_params_counts_the_real_modules(tiny_cfg: ModelConfig, tie: bool) -> None:
    cfg = replace(tiny_cfg, tie_embeddings=tie)
    assert cfg.num_params() == sum(p.numel() for p in Llama(cfg).parameters())


def test_flops_per_token_is_6n_plus_attention() -> None:
    cfg = ModelConfig(
        vocab_size=32000, num_layers=6, d_model=512, num_heads=8, num_kv_heads=4, d_ff=1408
    )
    assert cfg.flops_per_token(512) == pytest.approx(223.4e6, rel=1e-3)  # perf-anchors figure


def test_invalid_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(KeyError, match="unknown model preset"):
        preset("gpt-5")
    assert preset("xgen-7b", vocab_size=32000).vocab_size == 32000
