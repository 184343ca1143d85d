"""Deduplication: planted duplicates go, distinct documents stay, and state survives a restart."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import random
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.dedup import DedupConfig, Deduplicator, Signature, signature

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "corpus"
NEAR = DedupConfig(near=True)


def _vocabulary(rng: random.Random, size: int = 800) -> list[str]:
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    return ["".join(rng.choices(letters, weights, k=rng.randint(2, 9))) for _ in range(size)]


def _paragraphs(num: int, num_words: int, seed: int = 0) -> list[str]:
    """Distinct English-like paragraphs: Zipf-distributed words from one shared vocabulary."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng)
    zipf = [1 / rank for rank in range(1, len(vocab) + 1)]
    out = []
    for _ in range(num):
        words = rng.choices(vocab, zipf, k=num_words)
        lines = [" ".join(words[i : i + 12]) + "." for i in range(0, num_words, 12)]
        out.append("\n".join(lines))
    return out


def _run(docs: list[str], cfg: DedupConfig, dedup: Deduplicator | None = None) -> list[str | None]:
    dedup = dedup if dedup is not None else Deduplicator(cfg)
    return [dedup.check(f"doc{i}", signature(doc, cfg)) for i, doc in enumerate(docs)]


def _change_words(doc: str, positions: list[int]) -> str:
    words = doc.split(" ")
    for i in positions:
        words[i] = "CHANGED"
    return " ".join(words)


def _change_whitespace(doc: str) -> str:
    return "  " + doc.replace("\n", "\n\n\t").replace(" ", "   ") + "\n"


def test_exact_duplicates_are_dropped_and_first_copy_kept() -> None:
    a, b, c = _paragraphs(3, 60)
    decisions = _run([a, b, a, c, b, a], DedupConfig())
    assert decisions == [None, None, "exact_duplicate", None, "exact_duplicate", "exact_duplicate"]


@pytest.mark.parametrize("near", [False, True])
def test_near_duplicates_dropped_only_when_near_is_on(near: bool) -> None:
    base = _paragraphs(1, 350, seed=1)[0]
    assert 1800 < len(base) < 2600
    docs = [base, _change_words(base, [10, 120, 200, 300]), _change_whitespace(base)]
    expected = [None, "near_duplicate", "near_duplicate"] if near else [None, None, None]
    assert _run(docs, DedupConfig(near=near)) == expected


def test_chinese_near_duplicate_is_detected() -> None:
    base = (
        "春天来了，公园里的花都开了。孩子们在草地上放风筝，老人们坐在长椅上聊天。"
        "下午下了一场小雨，空气变得格外清新，街道两旁的树叶也更绿了。"
        "晚上，一家人围坐在桌边吃饭，谈论着今天发生的有趣的事情。"
    ) * 4
    edited = base.replace("风筝", "纸鸢", 1).replace("小雨", "大雨", 1)
    other = "我们使用深度学习方法训练了一个小型语言模型，并在多个数据集上评估了它的效果。" * 4
    assert _run([base, edited, other], NEAR) == [None, "near_duplicate", None]


def test_distinct_documents_are_all_kept() -> None:
    docs = _paragraphs(200, 80, seed=2)
    assert _run(docs, NEAR) == [None] * 200


def test_pickle_round_trip_mid_stream_gives_same_decisions() -> None:
    docs = _paragraphs(60, 100, seed=3)
    docs += [docs[5], _change_words(docs[7], [40]), _change_whitespace(docs[9])]
    random.Random(0).shuffle(docs)
    uninterrupted = _run(docs, NEAR)
    assert uninterrupted.count(None) == 60

    first = Deduplicator(NEAR)
    head = _run(docs[:30], NEAR, first)
    restored = pickle.loads(pickle.dumps(first))
    tail = [restored.check(f"doc{i}", signature(docs[i], NEAR)) for i in range(30, len(docs))]
    assert head + tail == uninterrupted


@pytest.mark.multiproc
def test_signature_is_deterministic_across_processes() -> None:
    docs = _paragraphs(2, 40, seed=4) + ["短文本", ""]
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter, other hash seed
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        remote = list(pool.map(partial(signature, cfg=NEAR), docs))
    for doc, sig in zip(docs, remote, strict=True):
        local = signature(doc, NEAR)
        assert sig.digest == local.digest and len(sig.digest) == 16
        assert sig.hashvalues is not None and local.hashvalues is not None
        np.testing.assert_array_equal(sig.hashvalues, local.hashvalues)


def test_exact_only_signature_has_no_minhash_and_near_dedup_refuses_it() -> None:
    sig = signature("hello world", DedupConfig())
    assert sig.hashvalues is None
    with pytest.raises(ValueError, match="no MinHash"):
        Deduplicator(NEAR).check("a", sig)
    small = signature("hello world", DedupConfig(near=True, num_perm=64))
    with pytest.raises(ValueError, match="expected num_perm=128"):
        Deduplicator(NEAR).check("a", small)


def test_reusing_a_key_for_a_new_document_is_an_error() -> None:
    a, b = _paragraphs(2, 60, seed=5)
    dedup = Deduplicator(NEAR)
    assert dedup.check("k", signature(a, NEAR)) is None
    with pytest.raises(ValueError, match="key 'k' was already used"):
        dedup.check("k", signature(b, NEAR))


def test_near_only_still_catches_exact_copies() -> None:
    (a,) = _paragraphs(1, 60, seed=6)
    cfg = DedupConfig(exact=False, near=True)
    assert _run([a, a], cfg) == [None, "near_duplicate"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"threshold": 0.0}, "dedup.threshold"),
        ({"threshold": 1.0}, "dedup.threshold"),
        ({"num_perm": 8}, "dedup.num_perm"),
        ({"shingle_chars": 0}, "dedup.shingle_chars"),
        ({"seed": -1}, "dedup.seed"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.") + ":"):
        DedupConfig(**kwargs)  # type: ignore[arg-type]


def test_threshold_too_close_to_one_for_num_perm_is_explained() -> None:
    with pytest.raises(ValueError, match="dedup.threshold: 0.95 is too close to 1"):
        Deduplicator(DedupConfig(near=True, threshold=0.95, num_perm=16))


def test_real_web_documents_only_template_page_is_a_near_duplicate() -> None:
    path = CORPUS / "llamafactory_pretrain_demo" / "c4_demo.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not found (shared corpus folder missing)")
    docs = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    dropped = {i: d for i, d in enumerate(_run(docs, NEAR)) if d is not None}
    # doc 106 is the same "placeholder page for <name>" template as doc 90, another name
    assert dropped == {106: "near_duplicate"}
    assert isinstance(signature(docs[0], NEAR), Signature)
