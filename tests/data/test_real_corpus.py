"""The data path on real corpora from ../shared/data/corpus: English fortunes, Chinese fortunes
and man pages, Python source. Skipped (with the reason) only where that folder is absent."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from lmforge.data.clean import CleanConfig
from lmforge.data.config import DataConfig
from lmforge.data.dedup import DedupConfig
from lmforge.data.loader import PackedLoader, split_sources
from lmforge.data.mixture import DocumentStream, MixtureSource, StreamState
from lmforge.data.packing import PackingConfig
from lmforge.data.sources import SourceConfig, read_documents
from lmforge.data.tokenize import tokenize_corpus
from lmforge.data.tokenizer import TokenizerConfig, sample_sources, train_tokenizer

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "corpus"
SOURCES = (
    SourceConfig(name="en", path=str(CORPUS / "fortunes_en"), max_bytes=300_000, weight=2.0),
    SourceConfig(name="zh", path=str(CORPUS / "fortunes_zh"), max_bytes=200_000, weight=1.0),
    SourceConfig(name="man", path=str(CORPUS / "manpages_zh_cn"), max_bytes=200_000, weight=1.0),
    SourceConfig(
        name="code",
        path=str(CORPUS / "python311_stdlib_code"),
        max_bytes=200_000,
        weight=1.0,
        max_epochs=2.0,
    ),
)


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    if not CORPUS.is_dir():
        pytest.skip(f"{CORPUS} not found (the shared corpus folder is not on this machine)")
    work = tmp_path_factory.mktemp("real")
    long_fortunes = [t for t in read_documents(SOURCES[0]) if len(t) > 500][:40]
    edited = [t.replace(" the ", " a ", 1) + " (edited)" for t in long_fortunes]
    (work / "edited.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in edited))
    planted = (
        SourceConfig(name="en_again", path=str(CORPUS / "fortunes_en"), max_bytes=30_000),
        SourceConfig(name="en_edited", path=str(work / "edited.jsonl")),
    )
    streams = {s.name: read_documents(s) for s in SOURCES}
    sample = sample_sources(streams, {s.name: 1.0 for s in SOURCES}, max_bytes=600_000)
    tokenizer = train_tokenizer(sample, TokenizerConfig(vocab_size=2048))
    cfg = DataConfig(
        sources=SOURCES + tuple(replace(p, weight=0.0) for p in planted),
        clean=CleanConfig(min_chars=20),
        dedup=DedupConfig(near=True),
        heldout_fraction=0.02,
        shard_tokens=40_000,
        workers=2,
    )
    out = work / "shards"
    manifest = tokenize_corpus(cfg, tokenizer, out)
    return out, manifest | {"tokenizer_sha256": tokenizer.sha256, "planted": len(edited)}


def test_real_corpus_drops_are_counted_and_duplicates_found(real_shards: tuple[Path, dict]) -> None:
    _, manifest = real_shards
    for counts in manifest["sources"].values():
        kept = counts["train"]["docs"] + counts["val"]["docs"]
        assert counts["read"] == kept + sum(counts["dropped"].values())
    en = manifest["sources"]["en"]
    assert en["dropped"].get("too_short", 0) > 0  # one-line fortunes under 20 characters
    assert len(en["train"]["shards"]) > 1  # rolled over at 40K tokens
    again = manifest["sources"]["en_again"]  # the first 30 KB of the same file, read again
    assert set(again["dropped"]) <= {"exact_duplicate", "too_short"}
    assert again["train"]["docs"] + again["val"]["docs"] == 0
    edited = manifest["sources"]["en_edited"]  # long fortunes with one word changed
    assert edited["dropped"].get("near_duplicate", 0) >= 0.9 * manifest["planted"]


def test_real_mixture_shares_within_one_percent_and_epochs_exact(
    real_shards: tuple[Path, dict],
) -> None:
    out, manifest = real_shards
    sets = split_sources(out, "train", manifest["tokenizer_sha256"])
    sources = [MixtureSource(s.name, sets[s.name], s.weight or 1.0, s.max_epochs) for s in SOURCES]
    loader = PackedLoader(sources, PackingConfig(seq_len=512), 16, (1, 2, 0), seed=7)
    code_tokens = sets["code"].num_tokens + 2 * sets["code"].num_docs
    rows = 0
    for _ in itertools.islice(loader, 500):  # 4M tokens: many epochs of every source
        rows += 16
    consumed = {k: sum(v) for k, v in loader.consumed_tokens().items()}
    total = sum(consumed.values())
    assert total == rows * 512
    assert loader.consumed_tokens()["code"] == [code_tokens, code_tokens]  # exactly twice
    uncapped = {"en": 2.0, "zh": 1.0, "man": 1.0}
    rest = total - consumed["code"]
    for name, weight in uncapped.items():  # code is capped; the others share the rest 2:1:1
        assert abs(consumed[name] / rest - weight / 4) < 0.01, (name, consumed)
    # and every code document was drawn exactly twice
    stream = DocumentStream(sources, seed=7, overhead=2)
    seen: Counter[int] = Counter()
    state = StreamState.start(len(sources))
    while state.tokens < total and (drawn := stream.draw(state)) is not None:
        d, _, state = drawn
        if d.source == 3:
            seen[d.index] += 1
    assert set(seen.values()) == {2} and len(seen) == sets["code"].num_docs
