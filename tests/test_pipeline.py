"""The pipeline's view of the shards (per-source splits, the pretraining mixture), and what the
stages that start from a checkpoint read with it."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from lmforge import pipeline
from lmforge.data.loader import split_sources, whole_split
from lmforge.data.sources import DataError
from lmforge.data.tokenizer import TextTokenizer
from lmforge.generate import GenerateConfig
from lmforge.pipeline import mixture_sources
from lmforge.recipe import RecipeError, load_recipe
from tests.conftest import TINY_OVERRIDES


def test_val_parts_hold_each_sources_documents(prepared_run: Path) -> None:
    tokenizer = TextTokenizer.load(prepared_run / "tokenizer.json")
    shards = prepared_run / "shards"
    val = whole_split(shards, "val", tokenizer.sha256)
    parts = split_sources(shards, "val", tokenizer.sha256)
    assert sum(p.num_docs for p in parts.values()) == val.num_docs
    assert sum(p.num_tokens for p in parts.values()) == val.num_tokens

    def text(name: str) -> str:
        part = parts[name]
        return "".join(tokenizer.decode(part.document(i).tolist()) for i in range(part.num_docs))

    assert "chinese" in parts and sum("\u4e00" <= c <= "\u9fff" for c in text("chinese")) > 50
    for name in set(parts) - {"chinese"}:
        assert not any("\u4e00" <= c <= "\u9fff" for c in text(name)), name


def test_mixture_weights_default_to_source_sizes(prepared_run: Path) -> None:
    recipe = load_recipe(None, [*TINY_OVERRIDES, f"run_dir={prepared_run}"])
    tok = TextTokenizer.load(prepared_run / "tokenizer.json")
    natural = mixture_sources(recipe, prepared_run / "shards", tok)
    assert [s.weight for s in natural] == [s.docs.num_tokens + 2 * s.docs.num_docs for s in natural]
    sources = tuple(
        dataclasses.replace(s, weight=w, max_epochs=2.0)
        for s, w in zip(recipe.data.sources, (1.0, 2.0, 3.0), strict=True)
    )
    weighted = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, sources=sources))
    mixed = mixture_sources(weighted, prepared_run / "shards", tok)
    assert [(s.weight, s.max_epochs) for s in mixed] == [(1.0, 2.0), (2.0, 2.0), (3.0, 2.0)]
    fewer = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, sources=sources[:1]))
    with pytest.raises(RecipeError, match="re-run 'lmforge tokenize'"):
        mixture_sources(fewer, prepared_run / "shards", tok)
    # a weighted source left without train documents is an error, not a smaller mixture
    ghost = dataclasses.replace(sources[0], name="ghost", weight=1.0)
    more = dataclasses.replace(recipe.data, sources=(*sources, ghost))
    with pytest.raises(RecipeError, match=r"no train documents from sources \['ghost'\]"):
        mixture_sources(dataclasses.replace(recipe, data=more), prepared_run / "shards", tok)
    unused = dataclasses.replace(
        recipe.data, sources=(*sources, dataclasses.replace(ghost, weight=0.0))
    )
    assert (
        len(mixture_sources(dataclasses.replace(recipe, data=unused), prepared_run / "shards", tok))
        == 3
    )


def test_held_out_packing_is_the_evaluators_choice(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model trained on plain causal packed rows is scored as trained by default, or with
    every document alone (eval.document_masking: true), as a masked model would be."""
    from lmforge import pipeline

    base = [*TINY_OVERRIDES, f"run_dir={tiny_run}", "packing.document_masking=false"]
    pipeline.pretrain_stage(load_recipe(None, [*base, "train.max_tokens=2048"]))
    seen: list[bool] = []
    loader = pipeline.training.PackedLoader  # the held-out perplexity's loader

    def spy(val: object, packing: object, *args: object, **kwargs: object) -> object:
        seen.append(packing.document_masking)  # type: ignore[attr-defined]
        return loader(val, packing, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline.training, "PackedLoader", spy)
    losses = {}
    for setting in (None, False, True):
        extra = [] if setting is None else [f"eval.document_masking={str(setting).lower()}"]
        losses[setting] = pipeline.eval_stage(load_recipe(None, [*base, *extra]))["val_loss"]
        assert set(seen) == {setting is True}  # the whole split and each source part
        seen.clear()
    assert losses[None] == losses[False] != losses[True]


def test_a_checkpoint_of_another_run_keeps_its_tokenizer_and_context(
    tiny_run: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """generate/export --checkpoint OTHER_RUN/checkpoints/step_* read OTHER_RUN's tokenizer,
    not the recipe's run dir's; generate keeps prompt + new tokens inside the trained context."""
    args = [*TINY_OVERRIDES, "train.stop_at_step=2", "train.save_every_steps=2"]
    first = load_recipe(None, [*args, f"run_dir={tiny_run}"])
    pipeline.pretrain_stage(first)
    ckpt = tiny_run / "checkpoints" / "step_00000002"
    second = load_recipe(
        None, [*args, f"run_dir={tmp_path / 'second'}", "tokenizer.vocab_size=300"]
    )
    pipeline.train_tokenizer_stage(second)

    prompts = ["The river", "水"]
    cfg = GenerateConfig(temperature=0, max_new_tokens=6)
    assert pipeline.generate_stage(second, prompts, ckpt, cfg) == pipeline.generate_stage(
        first, prompts, None, cfg
    )
    out = pipeline.export_stage(second, checkpoint=ckpt, out=tmp_path / "hf")
    monkeypatch.chdir(tiny_run / "checkpoints")  # `--checkpoint step_X` given from there
    from lmforge.pipeline.training import checkpoint_tokenizer

    relative = checkpoint_tokenizer(second, Path("step_00000002"))
    assert relative == tiny_run / "tokenizer.json"
    from lmforge.assistant import Assistant  # chat and serve find it the same way

    chat = Assistant.load("step_00000002")
    assert (
        chat.name == tiny_run.name and chat.tokenizer.sha256 == TextTokenizer.load(relative).sha256
    )
    exported = TextTokenizer.load(out / "tokenizer.json").backend.get_vocab()
    assert exported == TextTokenizer.load(tiny_run / "tokenizer.json").backend.get_vocab()

    with caplog.at_level(logging.WARNING, logger="lmforge"):
        pipeline.generate_stage(first, ["x"], None, GenerateConfig(max_new_tokens=1000))
    assert "max_new_tokens 1000 cut to 62" in caplog.text  # 64 - (BOS + "x")
    with pytest.raises(ValueError, match="fills the model's trained context of 64 tokens"):
        pipeline.generate_stage(first, ["word " * 80], None, cfg)


@pytest.mark.parametrize(
    ("override", "setting"),
    [
        ("data.heldout_fraction=0.5", "data.heldout_fraction"),
        ("data.clean.min_chars=50", "data.clean"),
        ("data.dedup.near=true", "data.dedup"),
    ],
)
def test_shards_written_with_other_data_settings_are_refused(
    prepared_run: Path, override: str, setting: str
) -> None:
    """A recipe edited after tokenize (held-out share, cleaning, dedup) would train on shards
    it did not ask for; pretrain and data-inspect say so instead."""
    tokenizer = TextTokenizer.load(prepared_run / "tokenizer.json")
    same = load_recipe(None, [*TINY_OVERRIDES, f"run_dir={prepared_run}"])
    assert mixture_sources(same, prepared_run / "shards", tokenizer)
    edited = load_recipe(None, [*TINY_OVERRIDES, f"run_dir={prepared_run}", override])
    with pytest.raises(RecipeError, match=f"written with other {setting}"):
        mixture_sources(edited, prepared_run / "shards", tokenizer)


def test_skipped_bad_input_is_skipped_by_every_stage_that_reads_sources(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With data.on_error=skip a malformed line lets train-tokenizer and tokenizer-report run
    (tokenize already recorded and skipped it); without, they stop at file:line."""
    corpus = tmp_path / "corpus.jsonl"
    lines = [f'{{"text": "document {i} has a few words in it."}}' for i in range(40)]
    corpus.write_text("\n".join([*lines[:20], '{"text": ', *lines[20:]]) + "\n")
    overrides = [
        *TINY_OVERRIDES,
        f"run_dir={tmp_path / 'run'}",
        f"data.sources=[{{name: web, path: '{corpus}'}}]",
        "tokenizer.vocab_size=300",
        "tokenizer.source_shares={}",
    ]
    with pytest.raises(DataError, match=r"corpus.jsonl:21: malformed JSON"):
        pipeline.train_tokenizer_stage(load_recipe(None, overrides))
    recipe = load_recipe(None, [*overrides, "data.on_error=skip"])
    with caplog.at_level(logging.WARNING):
        pipeline.train_tokenizer_stage(recipe)
    assert "skipped: " in caplog.text and "corpus.jsonl:21: malformed JSON" in caplog.text
    report = pipeline.tokenizer_report_stage(recipe, [])
    assert [row["source"] for row in report["rows"]] == ["web"]
