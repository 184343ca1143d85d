"""Supervised fine-tuning data: rendered conversations packed into rows, epoch after epoch.

Conversations are rendered once (chat.py) and split into train and held-out by a hash of their
text, so the split does not move when files are reordered. Each epoch shuffles the train
conversations with a seeded permutation and packs them greedily, in that order, into rows of T
tokens: a conversation that does not fit in what is left of a row starts the next one, so none is
cut across rows. Positions restart at each conversation (no attention across conversations) and
labels are taken only where the chat mask says so (assistant tokens). A conversation longer than
T is truncated or dropped, as configured, and counted.

The loader's state is the global row count, so like the pretraining loader it resumes exactly
and re-splits over another world size (rank r takes rows r, r + world, ...).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from lmforge.data.chat import read_chat_records as read_records
from lmforge.data.chat import render, to_messages
from lmforge.data.packing import IGNORE_INDEX, PackedBatch
from lmforge.data.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SFTConfig:
    paths: tuple[str, ...] = ()
    """Chat data: .json (a list), .jsonl, .parquet files or hf:NAME[:split]."""
    epochs: float = 3.0
    """Passes over the train conversations (XGen-7B-Inst: 3)."""
    heldout_fraction: float = 0.05
    """Share of conversations held out for the assistant-token loss."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """A conversation longer than a row: keep its first T+1 tokens, or leave it out."""
    pack: bool = True
    """Several conversations per row; False: one per row, padded."""
    tokenizer: str | None = None
    """Tokenizer of the base model; None: the tokenizer.json of the run that train.init_from's
    checkpoint belongs to."""

    def __post_init__(self) -> None:
        if self.epochs <= 0 or not 0 <= self.heldout_fraction < 1:
            raise ValueError(
                f"sft: need epochs > 0 and 0 <= heldout_fraction < 1, got {self.epochs} "
                f"and {self.heldout_fraction}"
            )


@dataclass(frozen=True)
class Conversation:
    ids: np.ndarray
    """Token ids, BOS first."""
    mask: np.ndarray
    """True where the token is a target (assistant content and its <|im_end|>)."""


@dataclass
class SFTData:
    train: list[Conversation]
    heldout: list[Conversation]
    counts: dict[str, int]
    """records, train, heldout, truncated, dropped, and train/heldout target tokens."""


def load_sft_data(cfg: SFTConfig, tokenizer: TextTokenizer, seq_len: int) -> SFTData:
    """Every conversation of cfg.paths rendered, split, and fitted to rows of seq_len."""
    if not cfg.paths:
        raise ValueError("sft.paths: no chat data given")
    counts: dict[str, int] = dict.fromkeys(("records", "truncated", "dropped"), 0)
    train: list[Conversation] = []
    heldout: list[Conversation] = []
    for path in cfg.paths:
        for where, record in read_records(path):
            counts["records"] += 1
            ids, mask = render(to_messages(record, where), tokenizer)
            if len(ids) > seq_len + 1:
                if cfg.truncation == "drop":
                    counts["dropped"] += 1
                    continue
                counts["truncated"] += 1
                ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            if not mask[1:].any():  # truncation cut every assistant token
                counts["dropped"] += 1
                continue
            conversation = Conversation(ids, mask)
            (heldout if _held_out(ids, cfg.heldout_fraction) else train).append(conversation)
    if not train:
        raise ValueError(f"sft.paths: no train conversations in {list(cfg.paths)}")
    counts |= {"train": len(train), "heldout": len(heldout)}
    counts["train_targets"] = sum(int(c.mask[1:].sum()) for c in train)
    counts["heldout_targets"] = sum(int(c.mask[1:].sum()) for c in heldout)
    if counts["truncated"] or counts["dropped"]:
        log.warning(
            "sft: %d of %d conversations longer than %d tokens were %s",
            counts["truncated"] + counts["dropped"],
            counts["records"],
            seq_len,
            "truncated" if cfg.truncation == "truncate" else "dropped",
        )
    return SFTData(train, heldout, counts)


def _held_out(ids: np.ndarray, fraction: float) -> bool:
    digest = hashlib.blake2b(ids.astype(np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def pack_conversations(
    conversations: Sequence[Conversation], order: Sequence[int], seq_len: int, pack: bool
) -> list[list[int]]:
    """Rows as lists of conversation indices, filled greedily in `order` (each row holds at
    most seq_len + 1 tokens: the last is only a label)."""
    rows: list[list[int]] = []
    room = 0
    for i in order:
        n = len(conversations[i].ids)
        if pack and rows and n <= room:
            rows[-1].append(i)
            room -= n
        else:
            rows.append([i])
            room = seq_len + 1 - n
    return rows


def build_row(
    conversations: Sequence[Conversation], members: Sequence[int], seq_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, labels and positions of one row (int64, length seq_len)."""
    inputs = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(seq_len, dtype=np.int64)
    at = 0
    for i in members:
        c = conversations[i]
        n = min(len(c.ids), seq_len - at)  # the last conversation's final token: label only
        inputs[at : at + n] = c.ids[:n]
        positions[at : at + n] = np.arange(n)
        targets = np.where(c.mask[1:], c.ids[1:], IGNORE_INDEX)  # label of token t is t+1
        labels[at : at + min(n, len(targets))] = targets[:n]
        at += len(c.ids)
    if at < seq_len:
        positions[at:] = np.arange(seq_len - at)  # padding: its own masked-out segment
    return inputs, labels, positions


class SFTLoader:
    """Packed batches of chat rows for this rank, `epochs` passes, resumable by row count."""

    def __init__(
        self,
        conversations: Sequence[Conversation],
        seq_len: int,
        batch_size: int,
        pad_id: int,
        epochs: float,
        seed: int = 0,
        shuffle: bool = True,
        pack: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.conversations = list(conversations)
        self.seq_len, self.batch_size, self.pad_id = seq_len, batch_size, pad_id
        self.epochs, self.seed, self.shuffle, self.pack = epochs, seed, shuffle, pack
        self.rank, self.world_size = rank, world_size
        self._rows = 0
        self._tokens = 0
        """Conversation tokens in the rows produced so far (all ranks'), padding left out."""
        self._plans: dict[tuple[int, int], list[list[int]]] = {}
        self._lengths: dict[int, list[int]] = {}
        """Per row length: the rows of each epoch read (whole or in part)."""

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        key = (epoch, self.seq_len)
        if key not in self._plans:
            n = len(self.conversations)
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            rows = pack_conversations(self.conversations, order.tolist(), self.seq_len, self.pack)
            self._plans = {key: rows}  # one epoch's plan at a time
        return self._plans[key]

    def epoch_lengths(self) -> list[int]:
        """Rows of every epoch read, whole or in part. Each epoch packs its own shuffled
        order, so their row counts differ: a row index is placed by these, not by epoch 0's."""
        if self.seq_len not in self._lengths:
            epochs = range(int(np.ceil(self.epochs)))
            self._lengths[self.seq_len] = [len(self.epoch_rows(e)) for e in epochs]
        return self._lengths[self.seq_len]

    @property
    def total_rows(self) -> int:
        """The whole epochs' rows, then the fraction of the last one's."""
        lengths, whole = self.epoch_lengths(), int(self.epochs)
        part = self.epochs - whole
        return sum(lengths[:whole]) + (int(np.ceil(part * lengths[whole])) if part else 0)

    def _locate(self, row: int) -> tuple[int, int]:
        """(epoch, row within it) of a global row index."""
        for epoch, length in enumerate(self.epoch_lengths()):
            if row < length:
                return epoch, row
            row -= length
        raise IndexError(f"row {row} past the last epoch")

    @property
    def rows(self) -> int:
        """Global rows produced so far."""
        return self._rows

    def reshape(self, seq_len: int, batch_size: int) -> None:
        """A new micro-batch size at any time; a new seq_len only before the first row: the
        position is a row of the plan packed at one length, which another length moves."""
        if seq_len != self.seq_len and self._rows:
            raise ValueError(
                f"sft: rows are packed at seq_len {self.seq_len}; a stage cannot change it to"
                f" {seq_len} after {self._rows} rows"
            )
        self.seq_len, self.batch_size = seq_len, batch_size

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self._rows, "tokens": self._tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rows = int(state["rows"])
        self._tokens = int(state.get("tokens", self._rows * self.seq_len))  # before: with padding

    def consumed_tokens(self) -> dict[str, list[int]]:
        return {"sft": [self._tokens]}

    def __iter__(self) -> Iterator[PackedBatch]:
        total = self.total_rows
        while True:
            rows = []
            for _ in range(self.batch_size * self.world_size):
                if self._rows >= total:
                    break
                epoch, index = self._locate(self._rows)
                members = self.epoch_rows(epoch)[index]
                if self._rows % self.world_size == self.rank:
                    rows.append(build_row(self.conversations, members, self.seq_len, self.pad_id))
                held = sum(len(self.conversations[i].ids) for i in members)
                self._tokens += min(held, self.seq_len)  # the last token of a full row: a label
                self._rows += 1
            if not rows:
                return
            ids, labels, pos = (torch.from_numpy(np.stack(col)) for col in zip(*rows, strict=True))
            yield PackedBatch(ids, labels, pos)
