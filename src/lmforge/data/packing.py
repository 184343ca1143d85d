"""Pack documents into fixed-length training rows with per-document positions and labels.

Each document is wrapped as `BOS doc EOS` and the wrapped documents are laid end to end. A row
holds T inputs and T labels (the next token); positions count from 0 at every document start
and at the row start, so the model masks attention at document boundaries (ChuXin's EOS-reset
block-diagonal mask). The label of an EOS input, which would be the next document's BOS, is
ignored. Pure functions: the resumable cursor over a corpus lives in loader.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.model.loss import IGNORE_INDEX as IGNORE_INDEX  # where the loss skips a label
from lmforge.ranges import check_ranges


@dataclass(frozen=True, kw_only=True)
class PackingConfig:
    seq_len: int = 256
    """Tokens per training row (T)."""
    document_masking: bool = True
    """Block attention across documents (positions reset per document); False = plain causal."""
    split_documents: bool = True
    """True: rows are cut from the stream of documents wherever T falls (no padding). False: a
    document that would fit in a row but not in the rest of the current one starts the next row
    (the rest is padding), so synthetic sequences of T-2 tokens (passkey_N) stay whole; longer
    documents are still cut."""

    def __post_init__(self) -> None:
        check_ranges(self, positive=("seq_len",))


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor
    """(B, T) token ids."""
    labels: torch.Tensor
    """(B, T) next-token targets, IGNORE_INDEX where no loss is taken."""
    positions: torch.Tensor | None
    """(B, T) positions restarting per document; None = one causal sequence per row."""

    def to(self, device: torch.device | str) -> PackedBatch:
        pos = None if self.positions is None else self.positions.to(device, non_blocking=True)
        return PackedBatch(
            self.input_ids.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            pos,
        )

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def wrap_document(doc: np.ndarray, bos_id: int, eos_id: int) -> np.ndarray:
    """`BOS doc EOS` as int64."""
    out = np.empty(len(doc) + 2, dtype=np.int64)
    out[0], out[1:-1], out[-1] = bos_id, doc, eos_id
    return out


def wrap_targets(mask: np.ndarray) -> np.ndarray:
    """A document's target mask (True = the token is predicted) for `BOS doc EOS`: BOS is never
    a target, EOS is one when the document's last token is (an empty document's EOS is)."""
    last = bool(mask[-1]) if len(mask) else True
    return np.concatenate([[False], mask.astype(bool), [last]])


def pack_row(
    pieces: Sequence[np.ndarray],
    ends_document: Sequence[bool],
    seq_len: int,
    pad_id: int,
    targets: Sequence[np.ndarray | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row from consecutive pieces of wrapped documents holding up to T+1 tokens.

    `ends_document[i]` says piece i ends with its document's EOS; `targets[i]`, when given and
    not None, which of piece i's tokens are predicted (the rest get IGNORE_INDEX labels: e.g.
    only a retrieval sequence's answer). Returns int64 arrays of length T: inputs, labels
    (shifted by one; IGNORE_INDEX across a document boundary and past the end) and positions
    (0 at every piece start). Short rows (end of data) are padded with pad_id.
    """
    tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
    if len(tokens) > seq_len + 1:
        raise ValueError(f"pieces hold {len(tokens)} tokens, more than seq_len + 1 = {seq_len + 1}")
    positions = np.concatenate([np.arange(len(p)) for p in pieces]) if pieces else tokens
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    labels[: max(len(tokens) - 1, 0)] = tokens[1:]
    if targets is not None and any(t is not None for t in targets):
        wanted = np.concatenate(
            [
                np.ones(len(p), bool) if t is None else t
                for p, t in zip(pieces, targets, strict=True)
            ]
        )
        labels[: max(len(tokens) - 1, 0)][~wanted[1:]] = IGNORE_INDEX
    end = 0
    for piece, ends in zip(pieces, ends_document, strict=True):
        end += len(piece)
        if ends and end - 1 < seq_len:
            labels[end - 1] = IGNORE_INDEX  # EOS → next document's BOS is not a prediction
    inputs = np.full(seq_len, pad_id, dtype=np.int64)
    n = min(len(tokens), seq_len)
    inputs[:n] = tokens[:n]
    pos = np.zeros(seq_len, dtype=np.int64)
    pos[:n] = positions[:n]
    if n < seq_len:
        pos[n:] = np.arange(seq_len - n)  # padding forms its own masked-out segment
    return inputs, labels, pos


def collate(
    rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], document_masking: bool
) -> PackedBatch:
    """Stack rows into a PackedBatch; without masking the positions are dropped (plain causal)."""
    ids, labels, pos = (torch.from_numpy(np.stack(col)) for col in zip(*rows, strict=True))
    return PackedBatch(ids, labels, pos if document_masking else None)
