"""Resumable iterator of packed batches over the documents of a set of token shards.

The loader walks documents in a seeded per-epoch permutation and cuts the stream of wrapped
documents into rows. Its whole state is (epoch, document, offset, rows): saved with a checkpoint,
it makes the resumed run see exactly the batches the uninterrupted run would have seen. The row
order is global, so every rank holds the same state; rank r keeps rows r, r + world, ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmforge.data.packing import PackedBatch, PackingConfig, collate, pack_row, wrap_document
from lmforge.data.shards import Shard, ShardError, open_shard


class DocumentSet:
    """The documents of several shards behind one global index."""

    def __init__(self, paths: Sequence[Path], tokenizer_sha256: str | None = None) -> None:
        self.shards: list[Shard] = [open_shard(p) for p in paths]
        for shard in self.shards:
            if tokenizer_sha256 is not None and shard.tokenizer_sha256 != tokenizer_sha256:
                raise ShardError(
                    f"{shard.path}: written with another tokenizer (sha256 "
                    f"{shard.tokenizer_sha256[:12]}…, this run's is {tokenizer_sha256[:12]}…); "
                    "re-run 'lmforge tokenize'"
                )
        counts = [s.num_docs for s in self.shards]
        self.starts = np.cumsum([0, *counts])
        self.num_docs = int(self.starts[-1])

    def document(self, index: int) -> np.ndarray:
        shard, local = self._locate(index)
        return self.shards[shard].document(local)

    def document_bytes(self, index: int) -> int:
        """UTF-8 bytes of the source text of document `index`."""
        shard, local = self._locate(index)
        return int(self.shards[shard].doc_bytes[local])

    def _locate(self, index: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return shard, index - int(self.starts[shard])

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(int(s.doc_bytes.sum()) for s in self.shards)


class DocumentRange:
    """Documents [start, stop) of a DocumentSet, e.g. one source's part of the val split."""

    def __init__(self, docs: DocumentSet, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= docs.num_docs:
            raise ValueError(f"document range [{start}, {stop}) outside [0, {docs.num_docs})")
        self.docs, self.start, self.num_docs = docs, start, stop - start

    def document(self, index: int) -> np.ndarray:
        return self.docs.document(self.start + index)

    @property
    def num_tokens(self) -> int:
        return sum(len(self.document(i)) for i in range(self.num_docs))

    @property
    def num_bytes(self) -> int:
        return sum(self.docs.document_bytes(self.start + i) for i in range(self.num_docs))


@dataclass
class LoaderState:
    epoch: int = 0
    doc: int = 0
    """Index into this epoch's document order."""
    offset: int = 0
    """Tokens of the current wrapped document already consumed."""
    rows: int = 0
    """Global rows produced so far."""


class PackedLoader:
    """Batches of `batch_size` rows for this rank, forever (shuffle) or one pass (no shuffle)."""

    def __init__(
        self,
        docs: DocumentSet | DocumentRange,
        packing: PackingConfig,
        batch_size: int,
        special_ids: tuple[int, int, int],
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if docs.num_docs == 0:
            raise ValueError("no documents to load")
        self.docs, self.packing, self.batch_size = docs, packing, batch_size
        self.bos_id, self.eos_id, self.pad_id = special_ids
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.state = LoaderState()
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def state_dict(self) -> dict[str, int]:
        return asdict(self.state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = LoaderState(**state)

    def __iter__(self) -> Iterator[PackedBatch]:
        while True:
            rows = []
            for _ in range(self.batch_size * self.world_size):
                if self.exhausted:
                    break
                row = self._next_row()
                if self.state.rows % self.world_size == self.rank:
                    rows.append(row)
                self.state.rows += 1
            if not rows:
                return
            yield collate(rows, self.packing.document_masking)

    @property
    def exhausted(self) -> bool:
        return not self.shuffle and self.state.epoch > 0

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            n = self.docs.num_docs
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def _wrapped(self, epoch: int, doc: int) -> np.ndarray:
        index = int(self._order_for(epoch)[doc])
        return wrap_document(self.docs.document(index), self.bos_id, self.eos_id)

    def _next_row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read T+1 tokens at the cursor, then move it T on (the last token is only a label)."""
        T = self.packing.seq_len
        pieces, ends, _ = self._read(T + 1)
        _, _, cursor = self._read(T)
        self.state.epoch, self.state.doc, self.state.offset = cursor
        return pack_row(pieces, ends, T, self.pad_id)

    def _read(self, n: int) -> tuple[list[np.ndarray], list[bool], tuple[int, int, int]]:
        """Up to n tokens from the cursor as pieces of wrapped documents, and the cursor after."""
        epoch, doc, offset = self.state.epoch, self.state.doc, self.state.offset
        pieces, ends = [], []
        while n > 0 and (self.shuffle or epoch == 0):
            wrapped = self._wrapped(epoch, doc)
            piece = wrapped[offset : offset + n]
            pieces.append(piece)
            n -= len(piece)
            offset += len(piece)
            ends.append(offset == len(wrapped))
            if ends[-1]:
                epoch, doc, offset = self._next_doc(epoch, doc)
        return pieces, ends, (epoch, doc, offset)

    def _next_doc(self, epoch: int, doc: int) -> tuple[int, int, int]:
        doc += 1
        if doc == self.docs.num_docs:
            return epoch + 1, 0, 0
        return epoch, doc, 0
