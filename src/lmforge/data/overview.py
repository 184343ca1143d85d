"""What a run's data looks like: per-source counts, target vs planned vs realised shares, epochs,
and packed rows decoded with their document boundaries marked (`lmforge data-inspect`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmforge.data.mixture import DocumentStream, MixtureSource, MixtureStage, StreamState
from lmforge.data.packing import PackedBatch
from lmforge.data.tokenizer import TextTokenizer

BOUNDARY = "▌"
"""Printed where a document (piece) starts inside a packed row."""


def planned_mixture(
    sources: Sequence[MixtureSource], stages: Sequence[MixtureStage], seed: int, tokens: int
) -> dict[str, dict[str, float]]:
    """Replay the loader's document draw for `tokens` tokens: tokens and epochs per source.

    Drawing is cheap (no packing, no tensors), so this shows before training how often each
    source will be repeated and whether a `max_epochs` will end the run early.
    """
    stream = DocumentStream(sources, seed, shuffle=True, stages=stages, overhead=2)
    state = StreamState.start(len(sources))
    drawn = [0] * len(sources)
    while state.tokens < tokens:
        step = stream.draw(state)
        if step is None:
            break
        before = state.tokens
        d, length, state = step
        drawn[d.source] += min(length, tokens - before)  # the run ends inside the last one
    total = sum(drawn) or 1
    out = {}
    for i, s in enumerate(sources):
        source_tokens = sum(len(s.docs.document(j)) + 2 for j in range(s.docs.num_docs))
        out[s.name] = {
            "tokens": drawn[i],
            "share": drawn[i] / total,
            "epochs": drawn[i] / max(source_tokens, 1),
        }
    return out


def realised_mixture(consumed: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
    """Shares and per-epoch tokens from a loader's `consumed` state (what training saw)."""
    total = sum(sum(v) for v in consumed.values()) or 1
    return {
        name: {"tokens": sum(v), "share": sum(v) / total, "tokens_per_epoch": list(v)}
        for name, v in consumed.items()
    }


def target_shares(sources: Sequence[MixtureSource]) -> dict[str, float]:
    total = sum(s.weight for s in sources) or 1.0
    return {s.name: s.weight / total for s in sources}


def decode_rows(batch: PackedBatch, tokenizer: TextTokenizer, max_rows: int) -> list[str]:
    """Each row's text with BOUNDARY where a document piece starts (positions reset to 0).

    Without document masking there are no positions; then the BOS tokens mark the starts.
    """
    rows = []
    for r in range(min(max_rows, batch.input_ids.shape[0])):
        ids = batch.input_ids[r].tolist()
        if batch.positions is not None:
            starts = [i for i, p in enumerate(batch.positions[r].tolist()) if p == 0]
        else:
            starts = [0] + [i for i, t in enumerate(ids) if t == tokenizer.bos_id and i > 0]
        bounds = [*starts, len(ids)]
        pieces = [tokenizer.decode(ids[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
        rows.append("".join(BOUNDARY + p for p in pieces))
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.4f}" if abs(x) < 10 else f"{x:,.1f}"
        if isinstance(x, int):
            return f"{x:,}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
