"""Our Llama gives the same logits as transformers' LlamaForCausalLM with the same weights."""

from __future__ import annotations

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.llama import Llama

transformers = pytest.importorskip("transformers")


def hf_twin(model: Llama) -> torch.nn.Module:
    """An HF LlamaForCausalLM of the same shape holding our weights (renamed, nothing permuted)."""
    cfg = model.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    renamed = {
        k if k.startswith("lm_head.") else f"model.{k}": v for k, v in model.state_dict().items()
    }
    hf.load_state_dict(renamed, strict=True)
    return hf


@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("rope_theta", [10_000.0, 500_000.0])
def test_forward_matches_transformers_llama(
    num_kv_heads: int, tie: bool, rope_theta: float
) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=97,
        num_layers=2,
        d_model=64,
        num_heads=4,
        num_kv_heads=num_kv_heads,
        d_ff=96,
        rope_theta=rope_theta,
        tie_embeddings=tie,
        init_std=0.1,
    )
    model = Llama(cfg).eval()
    hf = hf_twin(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs)
