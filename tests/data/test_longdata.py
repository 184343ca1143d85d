"""Derived long-context sources: long documents only, concatenated neighbours, passkey sequences;
and a stage that weights them trains on them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lmforge import pipeline
from lmforge.data.loader import PackedLoader
from lmforge.data.longdata import ConcatDocuments, LongDocuments, PasskeyDocuments
from lmforge.data.tokenizer import TextTokenizer
from lmforge.recipe import RecipeError, load_recipe
from tests.conftest import TINY_OVERRIDES


class Docs:
    def __init__(self, lengths: list[int], base: int = 0) -> None:
        self.docs = [np.arange(n, dtype=np.uint16) + base + 100 * i for i, n in enumerate(lengths)]
        self.num_docs = len(self.docs)

    def document(self, index: int) -> np.ndarray:
        return self.docs[index]


def test_long_documents_keeps_only_long_ones_from_every_source() -> None:
    a, b = Docs([5, 50, 8, 70]), Docs([60, 3], base=1000)
    long_docs = LongDocuments([a, b], min_tokens=50)
    assert long_docs.num_docs == 3
    got = [long_docs.document(i) for i in range(3)]
    assert [len(d) for d in got] == [50, 70, 60] and got[2][0] == 1000


def test_concat_joins_neighbours_of_one_source_to_the_length() -> None:
    a, b = Docs([30, 30, 30, 30, 30]), Docs([10], base=5000)
    concat = ConcatDocuments([a, b], length=64, separator=[9999])
    assert concat.runs == [(0, 0, 3), (0, 3, 5), (1, 0, 1)]
    first = concat.document(0)
    assert len(first) == 64
    assert list(first[:31]) == [*a.document(0), 9999]
    assert list(first[31:62]) == [*a.document(1), 9999]
    assert len(concat.document(2)) == 10  # a short source gives what it has
    # 30 + 1 + 32 = 63 tokens fall short of 64: the next document fills the run
    tight = ConcatDocuments([Docs([30, 32, 40])], length=64, separator=[9999])
    assert tight.runs == [(0, 0, 3)] and len(tight.document(0)) == 64


def test_passkey_sequences_hide_a_key_and_ask_for_it(prepared_run: Path) -> None:
    tok = TextTokenizer.load(prepared_run / "tokenizer.json")
    text = "The river flows past the old mill and the fields beyond it. " * 40
    haystack = Docs([])
    haystack.docs, haystack.num_docs = [np.asarray(tok.encode(text))], 1
    seqs = PasskeyDocuments(haystack, 400, tok.encode, num_docs=10, seed=3)
    docs = [seqs.document(i) for i in range(10)]
    assert all(len(d) == 400 for d in docs)
    assert np.array_equal(seqs.document(4), docs[4])  # a pure function of the index
    decoded = [tok.decode(d.tolist()) for d in docs]
    keys = {d.rsplit(" ", 1)[-1].rstrip(".") for d in decoded}
    assert len(keys) > 5  # random keys
    for d in decoded:
        key = d.rsplit(" ", 1)[-1].rstrip(".")
        assert key.isdigit() and f"The pass key is {key}. Remember it." in d
        assert d.endswith(f"What is the pass key? The pass key is {key}.")
    depths = [d.index("The pass key is") / len(d) for d in decoded]
    assert max(depths) - min(depths) > 0.3  # the needle moves through the haystack


def test_passkey_sets_of_different_lengths_hide_different_keys() -> None:
    """Two passkey sources in one mixture (passkey_120, passkey_160) must not repeat each
    other's keys index for index, or the model sees each key twice."""

    def encode(text: str) -> list[int]:  # the answer " 12345." as one token 12345
        return [int(text.strip(" ."))] if text.strip(" .").isdigit() else [7] * 4

    short = PasskeyDocuments(Docs([3000], base=20_000), 120, encode, 50, seed=0)
    long = PasskeyDocuments(Docs([3000], base=20_000), 160, encode, 50, seed=0)
    same = sum(int(short.document(i)[-1]) == int(long.document(i)[-1]) for i in range(50))
    assert same <= 1


def test_passkey_haystacks_start_anywhere_in_the_corpus_not_only_at_document_starts() -> None:
    """Few document starts would make few haystacks, which a small model memorizes instead of
    learning to retrieve (seen: train loss 2 on passkey rows, retrieval at chance)."""
    haystack = Docs([3000, 3000, 3000], base=20_000)  # token t of document i is 20000+100i+t
    seqs = PasskeyDocuments(haystack, 120, lambda text: [7] * 4, num_docs=200, seed=0)
    starts = set()
    for i in range(200):
        doc = seqs.document(i)
        filler = doc[doc >= 20_000]
        steps = np.diff(filler)
        assert len(doc) == 120 and np.all((steps == 1) | (steps < 0))  # in order, wrapping
        starts.add(int(filler[0]))
    assert len(starts) > 150  # three documents, three starts before
    wrap = PasskeyDocuments(Docs([10, 0, 7]), 120, lambda text: [7] * 4, num_docs=5, seed=0)
    assert len(wrap.document(0)) == 120  # a haystack shorter than the room is repeated
    empty = PasskeyDocuments(Docs([0, 0]), 40, lambda text: [7] * 4, num_docs=5, seed=0)
    assert len(empty.document(0)) == 16  # nothing to fill with: preamble, needle, question, key


def test_passkey_haystacks_and_needles_can_follow_sentences() -> None:
    """With sentence-end ids the haystack starts after one and the needle goes right after one
    (or at the haystack's start), as the test lays out its prompts; without, anywhere."""

    def encode(text: str) -> list[int]:
        marks = {"There is": 5, " The pass": 6, "\nWhat": 7}
        return [next((m for k, m in marks.items() if text.startswith(k)), 8)] * 4

    haystack = Docs([3000, 3000, 3000], base=20_000)  # token t of document i is 20000+100i+t
    ends = frozenset(t for t in range(20_000, 24_000) if t % 10 == 9)
    aligned = PasskeyDocuments(haystack, 150, encode, 100, seed=0, sentence_ends=ends)
    anywhere = PasskeyDocuments(haystack, 150, encode, 100, seed=0)
    for seqs, follows in ((aligned, [100]), (anywhere, range(1, 40))):
        first, before_needle = [], []
        for i in range(100):
            doc = seqs.document(i)
            assert len(doc) == 150
            filler = doc[doc >= 20_000]
            first.append(int(filler[0]) % 10 == 0)  # the filler's first token starts a sentence
            at = int(np.flatnonzero(doc == 6)[0])
            at_end = doc[at + 4] == 7  # depth 100%: the test puts it right before the question
            before_needle.append(doc[at - 1] == 5 or int(doc[at - 1]) in ends or at_end)
        assert sum(first) in follows and sum(before_needle) in follows


def test_passkey_lengths_can_vary_between_a_fraction_of_n_and_n(prepared_run: Path) -> None:
    from lmforge.data.longdata import LongDataConfig, derived_sources

    tok = TextTokenizer.load(prepared_run / "tokenizer.json")
    cfg = LongDataConfig(passkey_haystack="filler", passkey_min_fraction=0.5)
    seqs = derived_sources({"passkey_400"}, {"a": Docs([50])}, cfg, tok.encode, seed=0)
    lengths = [len(seqs["passkey_400"].document(i)) for i in range(200)]
    assert min(lengths) >= 200 and max(lengths) <= 400 and len(set(lengths)) > 100
    assert [len(seqs["passkey_400"].document(i)) for i in range(5)] == lengths[:5]  # pure
    for i in (0, 7, 9):
        text = tok.decode(seqs["passkey_400"].document(i).tolist())
        key = text.split("The pass key is ")[1][:5]
        assert text.endswith(f"What is the pass key? The pass key is {key}.")
    fixed = derived_sources({"passkey_400"}, {"a": Docs([50])}, LongDataConfig(), tok.encode, 0)
    assert {len(fixed["passkey_400"].document(i)) for i in range(20)} == {400}
    with pytest.raises(ValueError, match="passkey_min_fraction must be in"):
        LongDataConfig(passkey_min_fraction=0)


def test_passkeys_can_hide_in_the_original_filler(prepared_run: Path) -> None:
    from lmforge.data.longdata import LongDataConfig, derived_sources
    from lmforge.eval.needle import PASSKEY_FILLER

    tok = TextTokenizer.load(prepared_run / "tokenizer.json")
    cfg = LongDataConfig(passkey_haystack="filler")
    seqs = derived_sources({"passkey_300"}, {"a": Docs([50])}, cfg, tok.encode, seed=0)
    text = tok.decode(seqs["passkey_300"].document(0).tolist())
    assert len(seqs["passkey_300"].document(0)) == 300
    assert PASSKEY_FILLER in text and "What is the pass key?" in text
    with pytest.raises(ValueError, match="passkey_haystack must be corpus or filler"):
        LongDataConfig(passkey_haystack="essays")


def test_passkey_answer_only_loss_trains_on_the_answer_alone(prepared_run: Path) -> None:
    """With `passkey_loss: answer` the loader's only targets in a passkey row are the answer
    (" 12345.") and the EOS after it: no loss on the haystack or the random key's statement."""
    from lmforge.data.longdata import LongDataConfig, derived_sources
    from lmforge.data.mixture import MixtureSource
    from lmforge.data.packing import IGNORE_INDEX, PackingConfig

    tok = TextTokenizer.load(prepared_run / "tokenizer.json")
    cfg = LongDataConfig(passkey_haystack="filler", passkey_loss="answer")
    seqs = derived_sources({"passkey_254"}, {"a": Docs([50])}, cfg, tok.encode, seed=0)
    passkeys = seqs["passkey_254"]
    special = (tok.bos_id, tok.eos_id, tok.pad_id)
    loader = PackedLoader([MixtureSource("p", passkeys)], PackingConfig(seq_len=256), 4, special)
    batch = next(iter(loader))
    for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist(), strict=True):
        text = tok.decode(ids)
        key = text.split("The pass key is ")[1][:5]
        targets = [t for t in labels if t != IGNORE_INDEX]
        assert tok.decode(targets[:-1]) == f" {key}." and targets[-1] == tok.eos_id
    assert PasskeyDocuments(Docs([50]), 60, tok.encode, 3, 0).target_mask(0) is None
    with pytest.raises(ValueError, match="passkey_loss must be all or answer"):
        LongDataConfig(passkey_loss="key")


def test_a_stage_weighting_derived_sources_trains_on_them(
    prepared_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(prepared_run, run_dir)
    recipe = load_recipe(
        None,
        [
            *TINY_OVERRIDES,
            f"run_dir={run_dir}",
            "train.log_every_steps=1",
            "long_data.min_tokens=200",
            "long_data.passkey_tokens=120",
            "long_data.concat_tokens=256",
            # the first stage reads short code documents: the switch waits for the one in hand
            "stages=[{name: base, tokens: 1024, mixture: {english: 0, chinese: 0, code: 1}},"
            " {name: extend, tokens: 2048, seq_len: 128, rope_theta: 40000,"
            "  mixture: {english: 0, chinese: 0, code: 0, long_docs: 1, concat_docs: 1,"
            "  passkey: 1, passkey_100: 1}}]",
        ],
    )
    records = pipeline.pretrain_stage(recipe)
    before, after = records[1]["tokens_by_source"], records[-1]["tokens_by_source"]
    assert before["passkey"] == before["long_docs"] == before["concat_docs"] == 0
    assert after["passkey"] > 0 and after["passkey_100"] > 0
    assert after["long_docs"] + after["concat_docs"] > 0
    with pytest.raises(RecipeError, match=r"reserved for derived data"):
        load_recipe(None, [*TINY_OVERRIDES, "data.sources=[{name: passkey, path: x.txt}]"])
