"""Packing, mixtures and the resumable loader: every token exactly once, shares as targeted,
exact resume across epochs, disjoint ranks."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.loader import DocumentSet, PackedLoader
from lmforge.data.mixture import (
    DocumentStream,
    MixtureSource,
    MixtureStage,
    StreamState,
    mixture_for,
)
from lmforge.data.packing import IGNORE_INDEX, PackedBatch, PackingConfig, pack_row, wrap_document
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


def test_pack_row_takes_labels_only_where_the_targets_say() -> None:
    a, b = wrap_document(np.array([5, 6, 7]), BOS, EOS), wrap_document(np.array([8]), BOS, EOS)
    only_last = np.array([False, False, False, True, True])  # BOS 5 6 [7 EOS]
    ids, labels, _ = pack_row([a, b[:2]], [True, False], 6, PAD, [only_last, None])
    assert ids.tolist() == [BOS, 5, 6, 7, EOS, BOS]
    assert labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, EOS, IGNORE_INDEX, 8]
    same = pack_row([a, b[:2]], [True, False], 6, PAD, [None, None])
    assert same[1].tolist() == pack_row([a, b[:2]], [True, False], 6, PAD)[1].tolist()


class Masked:
    """Documents of `docs` whose even-indexed ones are trained on their last 3 tokens only."""

    def __init__(self, docs: DocumentSet) -> None:
        self.docs, self.num_docs = docs, docs.num_docs

    def document(self, index: int) -> np.ndarray:
        return self.docs.document(index)

    def target_mask(self, index: int) -> np.ndarray | None:
        if index % 2:
            return None
        mask = np.zeros(len(self.docs.document(index)), dtype=bool)
        mask[-3:] = True
        return mask


@pytest.mark.parametrize("split", [True, False])
def test_target_masks_of_documents_survive_packing_and_cuts(docs: DocumentSet, split: bool) -> None:
    """Rows of 16 cut documents anywhere: each label is the plain loader's, or ignored exactly
    where the document says its token is not a target."""
    packing = PackingConfig(seq_len=16, split_documents=split)
    plain = list(PackedLoader(docs, packing, 3, SPECIAL, shuffle=False))
    masked = list(
        PackedLoader([MixtureSource("m", Masked(docs))], packing, 3, SPECIAL, seed=0, shuffle=False)
    )
    got = np.concatenate([b.labels.flatten().numpy() for b in masked])
    want = np.concatenate([b.labels.flatten().numpy() for b in plain])
    assert np.array_equal(
        np.concatenate([b.input_ids.flatten().numpy() for b in masked]),
        np.concatenate([b.input_ids.flatten().numpy() for b in plain]),
    )
    kept = got != IGNORE_INDEX
    assert np.array_equal(got[kept], want[kept])
    expected = []  # the targets in order: all of odd documents, the last 3 and EOS of even ones
    for i in range(docs.num_docs):
        doc = docs.document(i).tolist()
        expected += (doc if i % 2 else doc[-3:]) + [EOS]
    assert got[kept].tolist() == expected


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


def test_whole_documents_start_a_row_instead_of_being_cut(docs: DocumentSet) -> None:
    """split_documents=False: every document that fits a row (wrapped length <= T+1) lies in
    one row; longer ones are cut as before; every token is still predicted once; resume exact."""
    T = 24
    cfg = PackingConfig(seq_len=T, split_documents=False)
    batches = list(PackedLoader(docs, cfg, 3, SPECIAL, shuffle=False))
    targets = np.concatenate([b.labels.flatten().numpy() for b in batches])
    expected = np.concatenate([np.append(docs.document(i), EOS) for i in range(docs.num_docs)])
    assert targets[targets != IGNORE_INDEX].tolist() == expected.tolist()
    rows = [r for b in batches for r in b.input_ids.numpy()]
    for i in range(docs.num_docs):
        wrapped = wrap_document(docs.document(i), BOS, EOS).tolist()
        if len(wrapped) <= T:  # fits inputs whole: some row holds it from BOS to EOS
            assert any(
                r[j : j + len(wrapped)].tolist() == wrapped for r in rows for j in range(T)
            ), i
    cut = list(PackedLoader(docs, PackingConfig(seq_len=T), 3, SPECIAL, shuffle=False))
    assert len(batches) >= len(cut)  # padding instead of cuts
    assert sum(int((b.input_ids == PAD).sum()) for b in batches) > 0

    def make() -> PackedLoader:
        return PackedLoader(docs, cfg, 2, SPECIAL, seed=3)

    straight = list(itertools.islice(make(), 30))
    for at in (1, 13, 29):
        _same(straight, _resumed(make, at, 30 - at))


class Constant:
    """`num_docs` documents of `length` copies of one token."""

    def __init__(self, token: int, length: int, num_docs: int = 50) -> None:
        self.token, self.length, self.num_docs = token, length, num_docs

    def document(self, index: int) -> np.ndarray:
        return np.full(self.length, self.token, dtype=np.int64)


class Listed:
    def __init__(self, docs: list[np.ndarray]) -> None:
        self.docs, self.num_docs = docs, len(docs)

    def document(self, index: int) -> np.ndarray:
        return self.docs[index]


def test_a_whole_document_ending_exactly_at_the_row_end_is_read_once() -> None:
    """Rows of 16 read 17 tokens (the last only a label): 5 + 12 wrapped tokens fill one
    exactly, and the 12-token document must not start the next row again."""
    docs = [np.arange(n) + 10 * i + 10 for i, n in enumerate([3, 10] * 6)]
    cfg = PackingConfig(seq_len=16, split_documents=False)
    batches = list(PackedLoader(Listed(docs), cfg, 2, SPECIAL, shuffle=False))
    targets = np.concatenate([b.labels.flatten().numpy() for b in batches])
    expected = np.concatenate([np.append(d, EOS) for d in docs])
    assert targets[targets != IGNORE_INDEX].tolist() == expected.tolist()


def test_padding_counts_toward_the_mixture_stage_switch() -> None:
    """Rows of 16 holding one 12-token wrapped document and 4 tokens of padding: a stage at
    10 rows x 16 tokens switches at row 10 (the trainer's token count), not at row 14 (where
    the documents alone would reach 160 tokens)."""
    sources = [MixtureSource("a", Constant(50, 10)), MixtureSource("b", Constant(60, 3), 0.0)]
    stage = MixtureStage(from_tokens=10 * 16, weights={"a": 0.0, "b": 1.0})
    cfg = PackingConfig(seq_len=16, split_documents=False)
    loader = PackedLoader(sources, cfg, 1, SPECIAL, seed=0, stages=[stage])
    rows = [b.input_ids[0].numpy() for b in itertools.islice(loader, 16)]
    assert all((r == PAD).sum() == 4 and (r == 50).sum() == 10 for r in rows[:10])
    first_b = next(i for i, r in enumerate(rows) if (r == 60).any())
    assert first_b == 10
    assert not any((r == 50).any() for r in rows[first_b + 1 :])


def _same(a: list[PackedBatch], b: list[PackedBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.input_ids == y.input_ids).all() and (x.labels == y.labels).all()
        assert x.positions is not None and y.positions is not None
        assert (x.positions == y.positions).all()


def _resumed(make: Callable[[], PackedLoader], head: int, tail: int) -> list[PackedBatch]:
    """`head` batches, state through JSON into a fresh loader, then `tail` more batches."""
    first = make()
    batches = list(itertools.islice(first, head))
    second = make()
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    return batches + list(itertools.islice(second, tail))


def test_resume_from_state_gives_the_same_batches(docs: DocumentSet) -> None:
    cfg = PackingConfig(seq_len=16)

    def make() -> PackedLoader:
        return PackedLoader(docs, cfg, 2, SPECIAL, seed=3)

    straight = list(itertools.islice(make(), 40))
    for cut in (1, 17, 39):
        _same(straight, _resumed(make, cut, 40 - cut))
    loader = make()
    list(itertools.islice(loader, 40))
    assert len(loader.consumed_tokens()["all"]) >= 2  # 40 batches of 32 tokens cross an epoch


def test_resume_exactly_at_every_epoch_boundary(two_sources: list[MixtureSource]) -> None:
    """Cut the run at every batch around each source's epoch boundary (litgpt #1712)."""

    def make() -> PackedLoader:
        return PackedLoader(two_sources, PackingConfig(seq_len=16), 2, SPECIAL, seed=5)

    straight = list(itertools.islice(make(), 200))
    epochs_at = []
    probe = make()
    for _ in itertools.islice(probe, 200):
        epochs_at.append(tuple(len(c) for c in probe.consumed_tokens().values()))
    changes = [i for i in range(1, 200) if epochs_at[i] != epochs_at[i - 1]]
    assert len(changes) >= 3
    for cut in {c + d for c in changes for d in (0, 1)}:
        _same(straight, _resumed(make, cut, 200 - cut))


def test_epochs_reshuffle_documents(docs: DocumentSet) -> None:
    stream = DocumentStream([MixtureSource("a", docs)], seed=0)
    assert stream._order(0, 0).tolist() != stream._order(0, 1).tolist()
    assert sorted(stream._order(0, 1).tolist()) == list(range(docs.num_docs))


def test_ranks_split_the_global_rows(docs: DocumentSet) -> None:
    cfg = PackingConfig(seq_len=16)
    whole = next(iter(PackedLoader(docs, cfg, 4, SPECIAL)))
    ranks = [next(iter(PackedLoader(docs, cfg, 2, SPECIAL, rank=r, world_size=2))) for r in (0, 1)]
    assert (ranks[0].input_ids == whole.input_ids[0::2]).all()
    assert (ranks[1].input_ids == whole.input_ids[1::2]).all()


def test_ranks_cover_a_finite_stream_disjointly_and_completely(docs: DocumentSet) -> None:
    sources = [MixtureSource("a", docs, max_epochs=2)]
    cfg = PackingConfig(seq_len=16)
    whole = torch.cat([b.input_ids for b in PackedLoader(sources, cfg, 3, SPECIAL)])
    parts = [
        torch.cat(
            [b.input_ids for b in PackedLoader(sources, cfg, 3, SPECIAL, rank=r, world_size=3)]
        )
        for r in range(3)
    ]
    assert sum(len(p) for p in parts) == len(whole)
    for r in range(3):
        assert (parts[r] == whole[r::3]).all()


@pytest.fixture
def two_sources(tmp_path: Path) -> list[MixtureSource]:
    """A source of short documents (tokens 10..49) and one of long ones (tokens 50..99)."""
    rng = np.random.default_rng(1)
    sets = []
    for name, lo, hi, n_docs, lengths in (
        ("short", 10, 50, 40, (3, 30)),
        ("long", 50, 100, 9, (40, 120)),
    ):
        docs = [rng.integers(lo, hi, size=rng.integers(*lengths)) for _ in range(n_docs)]
        path = tmp_path / f"{name}.bin"
        write_shard(path, docs, [len(d) for d in docs], vocab_size=100, tokenizer_sha256="0" * 64)
        sets.append(MixtureSource(name, DocumentSet([path]), weight=1.0))
    return sets


def _source_of_targets(batches: list[PackedBatch]) -> tuple[int, int]:
    """Input tokens of (short, long) documents, BOS/EOS included, told apart by their content
    ids; a segment is a run of positions from 0 (a document piece)."""
    counts = [0, 0]
    for b in batches:
        assert b.positions is not None
        for ids, pos in zip(b.input_ids.tolist(), b.positions.tolist(), strict=True):
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for a, z in itertools.pairwise(starts):
                content = [t for t in ids[a:z] if t >= 10]
                if content:
                    counts[content[0] >= 50] += z - a
    return counts[0], counts[1]


def test_realised_token_shares_match_the_weights(two_sources: list[MixtureSource]) -> None:
    sources = [replace(two_sources[0], weight=0.3), replace(two_sources[1], weight=0.7)]
    loader = PackedLoader(sources, PackingConfig(seq_len=64), 8, SPECIAL, seed=2)
    batches = list(itertools.islice(loader, 60))  # ~30K tokens, many epochs of both sources
    short, long = _source_of_targets(batches)
    assert abs(short / (short + long) - 0.3) < 0.01
    consumed = {k: sum(v) for k, v in loader.consumed_tokens().items()}
    assert sum(consumed.values()) == 60 * 8 * 64
    assert abs(consumed["short"] / sum(consumed.values()) - 0.3) < 0.01
    assert len(loader.consumed_tokens()["long"]) > 3  # the small long source was repeated


def test_max_epochs_shows_every_document_exactly_that_often(
    two_sources: list[MixtureSource],
) -> None:
    sources = [replace(two_sources[0], max_epochs=2.0), replace(two_sources[1], max_epochs=0.5)]
    stream = DocumentStream(sources, seed=4, overhead=2)
    seen: Counter[tuple[int, int]] = Counter()
    state = StreamState.start(2)
    while (drawn := stream.draw(state)) is not None:
        d, _, state = drawn
        seen[(d.source, d.index)] += 1
    assert all(seen[(0, i)] == 2 for i in range(40))
    assert sum(1 for s, _ in seen if s == 1) == 4 or sum(1 for s, _ in seen if s == 1) == 5
    assert all(v == 1 for (s, _), v in seen.items() if s == 1)
    # the loader ends with the stream, having placed every drawn token in a row
    loader = PackedLoader(sources, PackingConfig(seq_len=16), 4, SPECIAL, seed=4)
    batches = list(loader)
    expected = sum(
        (len(sources[s].docs.document(i)) + 1) * n for (s, i), n in seen.items()
    )  # each document and its EOS are targets; BOS never is
    assert sum(b.num_targets for b in batches) == expected
    assert [len(v) for v in loader.consumed_tokens().values()] == [2, 1]


def test_mixture_stage_switches_the_shares(two_sources: list[MixtureSource]) -> None:
    stages = [MixtureStage(from_tokens=10_000, weights={"short": 0.0})]
    loader = PackedLoader(two_sources, PackingConfig(seq_len=64), 8, SPECIAL, stages=stages)
    before = list(itertools.islice(loader, 19))  # 9,728 tokens
    after = list(itertools.islice(loader, 20))[2:]  # skip the rows of documents drawn earlier
    assert min(_source_of_targets(before)) > 3000
    assert _source_of_targets(after)[0] == 0
    assert mixture_for(
        5, {"a": 1.0, "b": 2.0}, stages=[MixtureStage(from_tokens=5, weights={"a": 3.0})]
    ) == {"a": 3.0, "b": 2.0}
    # a later switch that leaves a source out keeps what an earlier one set (a recipe stage's
    # mixture and a data.mixture_stages entry inside it combine, neither undoes the other)
    two = [
        MixtureStage(from_tokens=10, weights={"b": 0.5}),
        MixtureStage(from_tokens=5, weights={"a": 3.0}),
    ]
    assert mixture_for(12, {"a": 1.0, "b": 2.0}, two) == {"a": 3.0, "b": 0.5}
    assert mixture_for(7, {"a": 1.0, "b": 2.0}, two) == {"a": 3.0, "b": 2.0}


def test_state_for_other_sources_is_refused(
    two_sources: list[MixtureSource], docs: DocumentSet
) -> None:
    a = PackedLoader(two_sources, PackingConfig(seq_len=8), 1, SPECIAL)
    b = PackedLoader(docs, PackingConfig(seq_len=8), 1, SPECIAL)
    with pytest.raises(ValueError, match=r"loader state is for sources \['short', 'long'\]"):
        b.load_state_dict(a.state_dict())
