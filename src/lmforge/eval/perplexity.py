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
from lmforge.ranges import check_ranges


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    every_steps: int = 50
    """Held-out evaluation every this many optimizer steps (0 = only at the end)."""
    max_batches: int | None = 20
    """Cap on held-out batches per evaluation; None = the whole validation split."""
    batch_size: int = 8
    """Rows per held-out batch."""
    document_masking: bool | None = None
    """Held-out rows: None packs them as training did; true: every document attends only to
    itself (as a model is used); false: packed rows attend across documents. Fixing it compares
    models trained with and without document masking on the same held-out condition."""

    def __post_init__(self) -> None:
        check_ranges(self, positive=("max_batches", "batch_size"), non_negative=("every_steps",))


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


@torch.no_grad()
def loss_by_position(
    model: nn.Module,
    documents: Iterable[torch.Tensor],
    length: int,
    bos_id: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> list[float]:
    """Mean loss (nats) at each position 0..length-1 over documents of at least `length` tokens.

    Each document is read from its start as `BOS doc[:length]`, in one causal sequence, so
    position p predicts token p with p tokens of context: the long-context curve (does loss
    keep falling past the training length, e.g. after RoPE base-frequency extension?).
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(length, dtype=torch.float64)
    count = 0
    for doc in documents:
        if len(doc) < length:
            continue
        ids = torch.cat([torch.tensor([bos_id]), torch.as_tensor(doc[:length]).long()]).to(device)
        with torch.autocast(
            device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
        ):
            logits = model(ids[None, :-1])
        nll = F.cross_entropy(logits[0].float(), ids[1:], reduction="none")
        total += nll.double().cpu()
        count += 1
    model.train(was_training)
    if count == 0:
        raise ValueError(f"no document has {length} tokens; choose a shorter length")
    return (total / count).tolist()


def position_bins(losses: list[float]) -> list[dict[str, float]]:
    """Mean loss over positions [0, 1), [1, 2), [2, 4), [4, 8), ...: a readable curve."""
    rows, start = [], 0
    while start < len(losses):
        end = min(max(1, 2 * start), len(losses))
        chunk = losses[start:end]
        rows.append({"from": start, "to": end, "loss": sum(chunk) / len(chunk)})
        start = end
    return rows
