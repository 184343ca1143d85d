"""Packing and the resumable loader: every token exactly once, exact resume, disjoint ranks."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.loader import DocumentSet, PackedLoader
from lmforge.data.packing import IGNORE_INDEX, PackingConfig, pack_row, wrap_document
from lmforge.data.shards import write_shard

BOS, EOS, PAD = 1, 2, 0
SPECIAL = (BOS, EOS, PAD)


@pytest.fixture
def docs(tmp_path: Path) -> DocumentSet:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=23)
    documents = [rng.integers(10, 100, size=n) for n in lengths]
    write_shard(
        tmp_path / "train_00000.bin",
        documents[:15],
        [3 * len(d) for d in documents[:15]],
        vocab_size=100,
        tokenizer_sha256="0" * 64,
    )
    write_shard(
        tmp_path / "train_00001.bin",
        documents[15:],
        [3 * len(d) for d in documents[15:]],
        vocab_size=100,
        tokenizer_sha256="0" * 64,
    )
    return DocumentSet(sorted(tmp_path.glob("train_*.bin")))


def test_pack_row_labels_and_positions() -> None:
    a, b = wrap_document(np.array([5, 6]), BOS, EOS), wrap_document(np.array([7]), BOS, EOS)
    ids, labels, pos = pack_row([a, b[:2]], [True, False], seq_len=5, pad_id=PAD)
    assert ids.tolist() == [BOS, 5, 6, EOS, BOS]
    assert labels.tolist() == [5, 6, EOS, IGNORE_INDEX, 7]  # EOS → next BOS is not a target
    assert pos.tolist() == [0, 1, 2, 3, 0]


def test_one_pass_covers_every_token_once_in_order(docs: DocumentSet) -> None:
    loader = PackedLoader(docs, PackingConfig(seq_len=16), 3, SPECIAL, shuffle=False)
    batches = list(loader)
    targets = np.concatenate([b.labels.flatten().numpy() for b in batches])
    targets = targets[targets != IGNORE_INDEX]
    expected = np.concatenate([np.append(docs.document(i), EOS) for i in range(docs.num_docs)])
    # every document token and its EOS is predicted once, in order; BOS is never a target
    assert targets.tolist() == expected.tolist()
    assert sum(b.num_targets for b in batches) == docs.num_tokens + docs.num_docs


def test_positions_restart_at_every_document(docs: DocumentSet) -> None:
    batch = next(iter(PackedLoader(docs, PackingConfig(seq_len=32), 2, SPECIAL, shuffle=False)))
    assert batch.positions is not None
    ids, pos = batch.input_ids.numpy(), batch.positions.numpy()
    assert ((ids == BOS) == (pos == 0))[:, 1:].all()  # a document starts exactly where BOS is
    plain = next(
        iter(
            PackedLoader(
                docs, PackingConfig(seq_len=32, document_masking=False), 2, SPECIAL, shuffle=False
            )
        )
    )
    assert plain.positions is None and (plain.input_ids == batch.input_ids).all()


def test_resume_from_state_gives_the_same_batches(docs: DocumentSet) -> None:
    cfg = PackingConfig(seq_len=16)
    straight = list(itertools.islice(PackedLoader(docs, cfg, 2, SPECIAL, seed=3), 40))
    first = PackedLoader(docs, cfg, 2, SPECIAL, seed=3)
    head = list(itertools.islice(first, 17))
    second = PackedLoader(docs, cfg, 2, SPECIAL, seed=3)
    second.load_state_dict(first.state_dict())
    tail = list(itertools.islice(second, 23))
    for a, b in zip(straight, head + tail, strict=True):
        assert (a.input_ids == b.input_ids).all() and (a.labels == b.labels).all()
        assert (a.positions == b.positions).all()  # type: ignore[operator]
    assert second.state.epoch >= 1  # 40 batches of 32 tokens cross an epoch boundary


def test_epochs_reshuffle_documents(docs: DocumentSet) -> None:
    loader = PackedLoader(docs, PackingConfig(seq_len=8), 1, SPECIAL, seed=0)
    assert [int(i) for i in loader._order_for(0)] != [int(i) for i in loader._order_for(1)]


def test_ranks_split_the_global_rows(docs: DocumentSet) -> None:
    cfg = PackingConfig(seq_len=16)
    whole = next(iter(PackedLoader(docs, cfg, 4, SPECIAL)))
    ranks = [next(iter(PackedLoader(docs, cfg, 2, SPECIAL, rank=r, world_size=2))) for r in (0, 1)]
    assert (ranks[0].input_ids == whole.input_ids[0::2]).all()
    assert (ranks[1].input_ids == whole.input_ids[1::2]).all()
