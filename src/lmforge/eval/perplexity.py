"""Held-out loss, perplexity and bits per byte over the validation shards.

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes of the text it predicts, so
models with different tokenizers compare fairly. Each document's targets are its tokens plus EOS;
documents cut at a row boundary lose their earlier context, as in training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.packing import IGNORE_INDEX, PackedBatch


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    every_steps: int = 50
    """Held-out evaluation every this many optimizer steps (0 = only at the end)."""
    max_batches: int | None = 20
    """Cap on held-out batches per evaluation; None = the whole validation split."""
    batch_size: int = 8
    """Rows per held-out batch."""


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    batches: Iterable[PackedBatch],
    device: torch.device,
    bytes_per_target: float,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean loss (nats/token), perplexity and bits per byte over the given batches.

    bytes_per_target: UTF-8 bytes of the split divided by its number of targets (tokens + one
    EOS per document); exact when every batch of the split is evaluated.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with torch.autocast(
            device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
        ):
            logits = model(batch.input_ids, batch.positions)
        loss = F.cross_entropy(
            logits.float().flatten(0, 1),
            batch.labels.flatten(),
            reduction="sum",
            ignore_index=IGNORE_INDEX,
        )
        total += loss.item()
        count += batch.num_targets
    model.train(was_training)
    if count == 0:
        raise ValueError("held-out evaluation saw no targets")
    mean = total / count
    return {
        "val_loss": mean,
        "val_ppl": math.exp(min(mean, 50.0)),
        "val_bpb": mean / math.log(2) / bytes_per_target,
        "val_tokens": float(count),
    }
