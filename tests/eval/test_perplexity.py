"""Loss by position: the long-context curve is the per-position loss of each long document."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.eval.perplexity import loss_by_position, position_bins
from lmforge.model.config import ModelConfig
from lmforge.model.llama import Llama


def test_loss_by_position_averages_each_long_document_from_its_start() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, d_ff=96)
    model = Llama(cfg).eval()
    docs = [torch.randint(3, 97, (n,)) for n in (40, 10, 25)]  # the 10-token one is too short
    losses = loss_by_position(model, docs, 20, 1, torch.device("cpu"))
    expected = torch.zeros(20)
    with torch.no_grad():
        for doc in (docs[0], docs[2]):
            ids = torch.cat([torch.tensor([1]), doc[:20]])
            expected += F.cross_entropy(model(ids[None, :-1])[0], ids[1:], reduction="none")
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float32), expected / 2)
    with pytest.raises(ValueError, match="no document has 50 tokens"):
        loss_by_position(model, docs, 50, 1, torch.device("cpu"))


def test_position_bins_double_in_width() -> None:
    bins = position_bins([float(i) for i in range(10)])
    assert [(b["from"], b["to"]) for b in bins] == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 10)]
    assert bins[3]["loss"] == pytest.approx(5.5)
