"""Resumable iterator of packed batches over token shards, from one source or a mixture.

The mixture (mixture.py) decides which document comes next; the loader cuts the stream of
wrapped documents into rows. Its whole state (the draw state, the document being cut, the
offset in it, rows so far) saved with a checkpoint makes the resumed run see exactly the batches
the uninterrupted run would have seen, across epoch boundaries too. The row order is global, so
every rank holds the same state and rank r keeps rows r, r + world, ...: a state saved at one
world size resumes at another.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.mixture import (
    Documents,
    DocumentStream,
    Draw,
    MixtureSource,
    MixtureStage,
    StreamState,
)
from lmforge.data.packing import (
    PackedBatch,
    PackingConfig,
    collate,
    pack_row,
    wrap_document,
    wrap_targets,
)
from lmforge.data.shards import Shard, ShardError, open_shard
from lmforge.data.tokenize import read_manifest


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


def split_sources(shards_dir: Path, split: str, tokenizer_sha256: str) -> dict[str, DocumentSet]:
    """Each source's documents of one split, in the manifest's source order (sources with no
    documents in the split are left out)."""
    manifest = read_manifest(shards_dir)
    return {
        name: DocumentSet([shards_dir / f for f in counts[split]["shards"]], tokenizer_sha256)
        for name, counts in manifest["sources"].items()
        if counts[split]["shards"]
    }


def whole_split(shards_dir: Path, split: str, tokenizer_sha256: str) -> DocumentSet:
    """All documents of one split, source after source."""
    names = read_manifest(shards_dir)["splits"][split]["shards"]
    if not names:
        raise ShardError(f"{shards_dir}: no {split} shards; re-run 'lmforge tokenize'")
    return DocumentSet([shards_dir / f for f in names], tokenizer_sha256)


@dataclass(frozen=True)
class LoaderState:
    stream: StreamState
    """Which documents have been drawn from which source."""
    head: Draw | None = None
    """The document being cut into rows; None between documents."""
    offset: int = 0
    """Tokens of the head's wrapped document already in rows."""
    rows: int = 0
    """Global rows produced so far."""
    consumed: tuple[tuple[int, ...], ...] = ()
    """Per source, per epoch: tokens placed in rows (BOS and EOS included)."""


class PackedLoader:
    """Batches of `batch_size` rows for this rank from one document set or a mixture of sources.

    Shuffled loaders draw forever unless every source has `max_epochs`; an unshuffled loader
    makes one pass over each source, in order (evaluation).
    """

    def __init__(
        self,
        docs: Documents | Sequence[MixtureSource],
        packing: PackingConfig,
        batch_size: int,
        special_ids: tuple[int, int, int],
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        stages: Sequence[MixtureStage] = (),
    ) -> None:
        sources = list(docs) if isinstance(docs, Sequence) else [MixtureSource("all", docs)]
        if not shuffle:
            sources = [replace(s, max_epochs=s.max_epochs or 1.0) for s in sources]
        self.stream = DocumentStream(sources, seed, shuffle, stages, overhead=2)
        self.names = [s.name for s in sources]
        self.packing, self.batch_size = packing, batch_size
        self.bos_id, self.eos_id, self.pad_id = special_ids
        self.rank, self.world_size = rank, world_size
        self.state = LoaderState(StreamState.start(len(sources)), consumed=((),) * len(sources))

    @property
    def rows(self) -> int:
        """Global rows produced so far."""
        return self.state.rows

    def reshape(self, seq_len: int, batch_size: int) -> None:
        """Cut the rows that follow at another length, `batch_size` at a time (a training stage
        boundary); the stream goes on where it was."""
        self.packing = replace(self.packing, seq_len=seq_len)
        self.batch_size = batch_size

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON data; the same on every rank (the row order is global)."""
        st = self.state
        return {
            "rows": st.rows,
            "head": None if st.head is None else [st.head.source, st.head.epoch, st.head.index],
            "offset": st.offset,
            "stream": asdict(st.stream),
            "consumed": {name: list(c) for name, c in zip(self.names, st.consumed, strict=True)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = list(state["consumed"])
        if names != self.names:
            raise ValueError(
                f"loader state is for sources {names}, this run reads {self.names}; "
                "resume with the data config the run started with (stages that add sources,"
                " e.g. derived long-context data, go in a new run with train.init_from)"
            )
        stream: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in state["stream"].items()
        }
        head = state["head"]
        self.state = LoaderState(
            stream=StreamState(**stream),
            head=None if head is None else Draw(*head),
            offset=state["offset"],
            rows=state["rows"],
            consumed=tuple(tuple(state["consumed"][n]) for n in names),
        )

    def consumed_tokens(self) -> dict[str, list[int]]:
        """Tokens each source has put in rows so far, per epoch: the realised mixture."""
        return {name: list(c) for name, c in zip(self.names, self.state.consumed, strict=True)}

    def __iter__(self) -> Iterator[PackedBatch]:
        while True:
            rows = []
            for _ in range(self.batch_size * self.world_size):
                row = self._next_row()
                if row is None:
                    break
                if self.state.rows % self.world_size == self.rank:
                    rows.append(row)
                self.state = replace(self.state, rows=self.state.rows + 1)
            if not rows:
                return
            yield collate(rows, self.packing.document_masking)

    def _next_row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Read T+1 tokens at the cursor, then move it T on (the last token is only a label).
        A row cut short (the data ends, or a whole document waits for the next row) is consumed
        entirely."""
        T = self.packing.seq_len
        pieces, ends, targets, _, peeked = self._read(T + 1, self.state)
        if not pieces:
            return None
        advance = min(T, sum(len(p) for p in pieces))
        _, _, _, owners, self.state = self._read(advance, self.state)
        if advance < T and peeked.head is not None:
            # padding before a whole document (not the end of the data): it counts toward the
            # stream's position like the tokens around it, so mixture stages switch where the
            # trainer's token count (rows x T) says, not later by all the padding so far
            stream = self.state.stream
            stream = replace(stream, tokens=stream.tokens + T - advance)
            self.state = replace(self.state, stream=stream)
        consumed = [list(c) for c in self.state.consumed]
        for d, n in owners:
            per_epoch = consumed[d.source]
            per_epoch.extend([0] * (d.epoch + 1 - len(per_epoch)))
            per_epoch[d.epoch] += n
        self.state = replace(self.state, consumed=tuple(tuple(c) for c in consumed))
        return pack_row(pieces, ends, T, self.pad_id, targets)

    def _read(
        self, n: int, state: LoaderState
    ) -> tuple[
        list[np.ndarray],
        list[bool],
        list[np.ndarray | None],
        list[tuple[Draw, int]],
        LoaderState,
    ]:
        """Up to n tokens at the cursor as pieces of wrapped documents (with each piece's target
        mask, None = all, and the document it came from) and the state after them; the state
        passed in is not changed."""
        stream, head, offset = state.stream, state.head, state.offset
        pieces: list[np.ndarray] = []
        ends: list[bool] = []
        targets: list[np.ndarray | None] = []
        owners: list[tuple[Draw, int]] = []
        row = self.packing.seq_len + 1
        whole = not self.packing.split_documents  # documents that fit a row are not cut
        placed = 0  # tokens of this row so far (both reads start at a row start)
        while n > 0:
            if head is None:
                drawn = self.stream.draw(stream)
                if drawn is None:
                    break
                head, _, stream = drawn
                offset = 0
            wrapped = wrap_document(self.stream.document(head), self.bos_id, self.eos_id)
            if whole and offset == 0 and pieces and row - placed < len(wrapped) <= row:
                break  # it fits a row of its own but not the rest of this one: it starts the next
            piece = wrapped[offset : offset + n]
            pieces.append(piece)
            mask = self.stream.target_mask(head)
            targets.append(None if mask is None else wrap_targets(mask)[offset : offset + n])
            owners.append((head, len(piece)))
            placed += len(piece)
            n -= len(piece)
            offset += len(piece)
            ends.append(offset == len(wrapped))
            if ends[-1]:
                head, offset = None, 0
        return (
            pieces,
            ends,
            targets,
            owners,
            replace(state, stream=stream, head=head, offset=offset),
        )
