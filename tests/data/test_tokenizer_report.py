"""Tokenizer compression report: exact ratios, language-specific columns, Markdown, PNG, errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from lmforge.data.tokenizer import TokenizerConfig, train_tokenizer
from lmforge.data.tokenizer_report import (
    Encoder,
    compression_table,
    load_reference,
    markdown_table,
    plot_bytes_per_token,
    write_report,
)

ENGLISH = [
    "The quick brown fox jumps over the lazy dog. Tokenizers compress text into ids.\n",
    "It's 2024, and small language models learn from balanced Chinese-English corpora.\n",
    "Byte pair encoding merges the most frequent pair of symbols, again and again.\n",
]
CHINESE = [
    "中华人民共和国成立于1949年。我们在北京学习自然语言处理。\n",
    "分词器把文本变成整数序列，压缩率越高，模型一次能看到的内容越多。\n",
    "机器学习和人工智能正在改变世界。今天天气很好，我们去公园散步。\n",
]
CODE = ["def add(a, b):\n    return a + b\n\n\nclass Foo:\n    pass\n"]
SOURCES = {"english": ENGLISH, "chinese": CHINESE, "code": CODE}
ENGLISH_WORDS = 14 + 12 + 13  # [A-Za-z]+ runs: "It's" is two, "Chinese-English" two, no "2024"

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed"
)


@pytest.fixture(scope="module")
def refs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("refs")


@pytest.fixture(scope="module")
def references(refs_dir: Path) -> dict[str, Path]:
    """Our own tokenizer.json and a plain whitespace `tokenizers` BPE, both tiny."""
    corpus = (ENGLISH + CHINESE + CODE) * 20
    ours = train_tokenizer(corpus, TokenizerConfig(vocab_size=600, pad_to_multiple_of=64))
    (refs_dir / "lmforge").mkdir()
    ours.save(refs_dir / "lmforge" / "tokenizer.json")

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False)
    )
    bpe.save(str(refs_dir / "plain_bpe.json"))
    return {
        "lmforge": refs_dir / "lmforge" / "tokenizer.json",
        "plain_bpe": refs_dir / "plain_bpe.json",
    }


@pytest.fixture(scope="module")
def sp_model(refs_dir: Path) -> Path | None:
    """A tiny sentencepiece BPE trained here (~20 ms); None where sentencepiece is missing."""
    if importlib.util.find_spec("sentencepiece") is None:
        return None
    import sentencepiece

    text_file = refs_dir / "sp_train.txt"
    text_file.write_text("".join((ENGLISH + CHINESE + CODE) * 20), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(refs_dir / "sp_tiny"),
        vocab_size=200,
        model_type="bpe",
        character_coverage=1.0,
        minloglevel=2,
    )
    return refs_dir / "sp_tiny.model"


@pytest.fixture(scope="module")
def encoders(references: dict[str, Path], sp_model: Path | None) -> dict[str, Encoder]:
    paths = [*references.values(), *([sp_model] if sp_model else [])]
    loaded = dict(load_reference(path) for path in paths)
    assert list(loaded)[:2] == ["lmforge", "plain_bpe"]  # folder of tokenizer.json, else stem
    return loaded


def test_load_reference_encodes_without_special_tokens(
    references: dict[str, Path], sp_model: Path | None
) -> None:
    _, encode = load_reference(references["lmforge"])
    ours = Tokenizer.from_file(str(references["lmforge"]))
    assert encode("你好, world") == ours.encode("你好, world", add_special_tokens=False).ids
    assert ours.token_to_id("<|bos|>") not in encode("hello")
    if sp_model is None:
        pytest.skip("sentencepiece not installed")
    name, sp_encode = load_reference(str(sp_model))  # str paths work too
    assert name == "sp_tiny"
    assert sp_encode("") == []
    assert all(isinstance(i, int) for i in sp_encode("我们 learn"))


def test_rows_have_exact_ratios(encoders: dict[str, Encoder]) -> None:
    rows = compression_table(encoders, SOURCES)
    assert [(r["tokenizer"], r["source"]) for r in rows] == [
        (t, s) for t in encoders for s in SOURCES
    ]
    for row in rows:
        texts, encode = SOURCES[row["source"]], encoders[row["tokenizer"]]
        assert row["tokens"] == sum(len(encode(t)) for t in texts)
        assert row["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
        assert row["chars"] == sum(len(t) for t in texts)
        assert row["docs"] == len(texts)
        assert row["bytes_per_token"] == row["bytes"] / row["tokens"]
        assert row["chars_per_token"] == row["chars"] / row["tokens"]


def test_han_and_word_columns_follow_the_language(encoders: dict[str, Encoder]) -> None:
    rows = compression_table(encoders, SOURCES)
    han = sum(1 for t in CHINESE for ch in t if "\u4e00" <= ch <= "\u9fff")
    for row in rows:
        if row["source"] == "chinese":
            assert row["language"] == "zh"
            assert row["tokens_per_1k_han"] == row["tokens"] * 1000 / han
            assert row["tokens_per_1k_words"] is None
        else:
            assert row["language"] == "other"
            assert row["tokens_per_1k_han"] is None
        if row["source"] == "english":
            assert row["tokens_per_1k_words"] == row["tokens"] * 1000 / ENGLISH_WORDS


def test_language_is_the_majority_of_letters() -> None:
    def count_chars(text: str) -> list[int]:
        return list(range(len(text)))

    mostly_english = ["A long English sentence that mentions 北京 once."]
    mostly_chinese = ["这是一个中文句子，里面有一个英文词 Python。"]
    rows = compression_table({"chars": count_chars}, {"en": mostly_english, "zh": mostly_chinese})
    assert [r["language"] for r in rows] == ["other", "zh"]
    assert rows[0]["tokens_per_1k_words"] == len(mostly_english[0]) * 1000 / 7
    assert rows[1]["tokens_per_1k_han"] == len(mostly_chinese[0]) * 1000 / 16


def test_trained_tokenizer_compresses(encoders: dict[str, Encoder]) -> None:
    rows = {(r["tokenizer"], r["source"]): r for r in compression_table(encoders, SOURCES)}
    assert rows["lmforge", "chinese"]["bytes_per_token"] > 1.0
    assert rows["lmforge", "english"]["bytes_per_token"] > 2.0


def test_empty_source_is_an_error(encoders: dict[str, Encoder]) -> None:
    with pytest.raises(ValueError, match="source 'empty' has no text"):
        compression_table(encoders, {"empty": ["", ""]})


def test_markdown_lists_every_tokenizer_and_source(encoders: dict[str, Encoder]) -> None:
    rows = compression_table(encoders, SOURCES)
    md = markdown_table(rows)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + len(rows)
    assert "bytes/token" in lines[0] and "tokens/1k Han" in lines[0]
    for name in [*encoders, *SOURCES]:
        assert f"| {name} |" in md
    assert all(line.count("|") == lines[0].count("|") for line in lines)


@needs_matplotlib
def test_plot_is_a_non_blank_png(encoders: dict[str, Encoder], tmp_path: Path) -> None:
    out = tmp_path / "bpt.png"
    plot_bytes_per_token(compression_table(encoders, SOURCES), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _assert_not_blank(out)
    assert list(tmp_path.iterdir()) == [out]  # temp file renamed away


@needs_matplotlib
def test_write_report_writes_json_md_png(encoders: dict[str, Encoder], tmp_path: Path) -> None:
    out_dir = tmp_path / "report"
    result = write_report(encoders, SOURCES, out_dir)
    names = ["tokenizer_report.json", "tokenizer_report.md", "tokenizer_report.png"]
    assert result["files"] == [str(out_dir / n) for n in names]
    assert sorted(p.name for p in out_dir.iterdir()) == names  # no temp files left
    assert json.loads((out_dir / names[0]).read_text(encoding="utf-8")) == {"rows": result["rows"]}
    md = (out_dir / names[1]).read_text(encoding="utf-8")
    assert md.endswith(markdown_table(result["rows"]))
    _assert_not_blank(out_dir / names[2])


def _assert_not_blank(png: Path) -> None:
    from matplotlib.image import imread

    pixels = imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert len(np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)) > 3  # bars, text, white


def test_reference_errors_name_the_path(refs_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nope.model: reference tokenizer not found"):
        load_reference(tmp_path / "nope.model")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a\nb\n")
    with pytest.raises(ValueError, match="vocab.txt: unsupported tokenizer file"):
        load_reference(vocab)
    bad_json = tmp_path / "broken.json"
    bad_json.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="broken.json: not a valid tokenizer.json"):
        load_reference(bad_json)
    with pytest.raises(ValueError, match="refs.*: reference tokenizer not found"):
        load_reference(refs_dir)  # a folder is not a file


def test_broken_sentencepiece_model_names_the_path(tmp_path: Path) -> None:
    pytest.importorskip("sentencepiece")
    bad_model = tmp_path / "broken.model"
    bad_model.write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="broken.model: not a valid sentencepiece model"):
        load_reference(bad_model)
