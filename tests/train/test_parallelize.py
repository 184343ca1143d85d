"""Activation checkpointing recomputes blocks without changing the function or the names."""

from __future__ import annotations

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.llama import Llama
from lmforge.train.parallelize import ParallelConfig, apply_activation_checkpointing, parallelize


def _grads(model: Llama, ids: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(ids, positions).float().square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("mode", "every"), [("full", 1), ("every", 2), ("every", 3)])
def test_checkpointed_blocks_give_the_same_gradients(
    tiny_cfg: ModelConfig, mode: str, every: int
) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**tiny_cfg.__dict__, "num_layers": 4})
    plain = Llama(cfg)
    checkpointed = Llama(cfg)
    checkpointed.load_state_dict(plain.state_dict())
    pcfg = ParallelConfig(activation_checkpointing=mode, checkpoint_every=every)  # type: ignore[arg-type]
    apply_activation_checkpointing(checkpointed, pcfg)
    wrapped = [i for i, b in enumerate(checkpointed.layers) if "forward" in b.__dict__]
    assert wrapped == list(range(0, 4, every))
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    positions = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)  # two documents
    expected, got = _grads(plain, ids, positions), _grads(checkpointed, ids, positions)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_one_process_is_left_unwrapped(tiny_cfg: ModelConfig) -> None:
    model = Llama(tiny_cfg)
    assert parallelize(model, ParallelConfig(), None, compile=False) is model
    with pytest.raises(ValueError, match="checkpoint_every"):
        ParallelConfig(checkpoint_every=0)
