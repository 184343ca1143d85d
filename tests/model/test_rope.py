"""The RoPE tables are cast once per forward to the dtype q and k will have."""

from __future__ import annotations

import torch

from lmforge.model.config import ModelConfig
from lmforge.model.llama import Llama
from lmforge.model.rope import compute_dtype

CFG = ModelConfig(vocab_size=64, num_layers=1, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64)


def test_compute_dtype_follows_autocast_where_it_casts() -> None:
    x = torch.ones(2, 3)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
        assert compute_dtype(x.double()) == torch.float64  # autocast leaves fp64 alone
    assert compute_dtype(torch.ones(2, device="meta")) == torch.float32  # no autocast there


def test_an_fp64_model_under_autocast_keeps_fp64_tables() -> None:
    """The tables once went through bf16 there: logits 0.12 off at positions up to 300."""
    torch.manual_seed(0)
    model = Llama(CFG).double()
    ids = torch.randint(0, 64, (1, 300))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = model(ids)
    assert torch.equal(under_autocast, model(ids))


def test_a_forward_on_the_meta_device_runs() -> None:
    with torch.device("meta"):
        model = Llama(CFG)
        logits = model(torch.zeros(1, 8, dtype=torch.long))
    assert logits.shape == (1, 8, 64) and logits.device.type == "meta"
