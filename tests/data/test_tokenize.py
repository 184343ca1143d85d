"""Sources to shards: documents decode back, counts add up, failures leave nothing behind."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from lmforge.data import tokenize_workers
from lmforge.data.clean import CleanConfig
from lmforge.data.config import DataConfig
from lmforge.data.dedup import DedupConfig
from lmforge.data.shards import list_shards, open_shard
from lmforge.data.sources import DataError, SourceConfig
from lmforge.data.tokenize import iter_corpus, split_of, tokenize_corpus
from lmforge.data.tokenizer import TextTokenizer, TokenizerConfig, train_tokenizer

ENGLISH = [f"Document number {i}: the cat sat on mat {i * 7}.\n" * (1 + i % 3) for i in range(40)]
CHINESE = [f"第{i}篇文章。今天天气很好，我们去公园散步。" * (1 + i % 2) for i in range(30)]
CODE = [f"def f{i}(x):\n\treturn x * {i}  # comment\n" for i in range(10)]


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return train_tokenizer(ENGLISH + CHINESE + CODE, TokenizerConfig(vocab_size=512))


def _sources(root: Path) -> tuple[SourceConfig, ...]:
    (root / "en").mkdir()
    (root / "en" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ENGLISH))
    with gzip.open(root / "zh.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"body": t}, ensure_ascii=False) + "\n" for t in CHINESE)
    (root / "code").mkdir()
    for i, text in enumerate(CODE):
        (root / "code" / f"f{i:02d}.txt").write_text(text)
    return (
        SourceConfig(name="english", path=str(root / "en")),
        SourceConfig(name="chinese", path=str(root / "zh.jsonl.gz"), text_field="body"),
        SourceConfig(name="code", path=str(root / "code" / "*.txt")),
    )


def _decoded(out: Path, split: str, tokenizer: TextTokenizer) -> list[str]:
    texts = []
    for path in list_shards(out, split):
        shard = open_shard(path)
        assert shard.tokenizer_sha256 == tokenizer.sha256
        for i in range(shard.num_docs):
            text = tokenizer.decode(shard.document(i).tolist())
            assert shard.doc_bytes[i] == len(text.encode("utf-8"))
            texts.append(text)
    return texts


def test_shards_decode_back_to_the_source_documents(
    tmp_path: Path, tokenizer: TextTokenizer
) -> None:
    cfg = DataConfig(
        sources=_sources(tmp_path), heldout_fraction=0.2, shard_tokens=500, batch_docs=7
    )
    out = tmp_path / "tokens"
    manifest = tokenize_corpus(cfg, tokenizer, out)
    train, val = _decoded(out, "train", tokenizer), _decoded(out, "val", tokenizer)
    assert Counter(train + val) == Counter(ENGLISH + CHINESE + CODE)
    assert val and all(split_of(t, 0.2) == "val" for t in val)
    assert len(list_shards(out, "train")) > 1  # rolled over at shard_tokens
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code", "en", "tokens", "zh.jsonl.gz"]


def test_manifest_counts_add_up(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    cfg = DataConfig(sources=_sources(tmp_path), heldout_fraction=0.2, shard_tokens=500)
    out = tmp_path / "tokens"
    manifest = tokenize_corpus(cfg, tokenizer, out)
    assert manifest["vocab_size"] == tokenizer.vocab_size
    sources = manifest["sources"]
    assert sources["code"]["train"]["docs"] + sources["code"]["val"]["docs"] == len(CODE)
    for split in ("train", "val"):
        totals = manifest["splits"][split]
        for key in ("docs", "tokens", "bytes"):
            assert totals[key] == sum(s[split][key] for s in sources.values())
        shards = [open_shard(out / name) for name in totals["shards"]]
        assert totals["tokens"] == sum(s.num_tokens for s in shards)
        assert totals["bytes"] == sum(int(s.doc_bytes.sum()) for s in shards)
    all_bytes = sum(len(t.encode("utf-8")) for t in ENGLISH + CHINESE + CODE)
    assert manifest["splits"]["train"]["bytes"] + manifest["splits"]["val"]["bytes"] == all_bytes
    assert sorted(manifest["shards"]) == sorted(p.name for p in out.glob("*.bin"))


def test_val_is_never_empty_with_two_docs(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    (tmp_path / "two.jsonl").write_text('{"text": "first doc"}\n{"text": "second doc"}\n')
    cfg = DataConfig(sources=(SourceConfig(name="s", path=str(tmp_path / "two.jsonl")),))
    manifest = tokenize_corpus(cfg, tokenizer, tmp_path / "out")
    assert manifest["splits"]["val"]["docs"] == 1 and manifest["splits"]["train"]["docs"] == 1


def test_failing_source_leaves_no_output_and_old_output_untouched(
    tmp_path: Path, tokenizer: TextTokenizer
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text('{"text": "good"}\n' * 3)
    (data / "b.jsonl").write_text('{"text": "good"}\n{"text": broken\n')
    cfg = DataConfig(sources=(SourceConfig(name="s", path=str(data)),), batch_docs=2)
    with pytest.raises(DataError, match="b.jsonl:2: malformed JSON"):
        tokenize_corpus(cfg, tokenizer, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]

    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text("previous run")
    with pytest.raises(DataError):
        tokenize_corpus(cfg, tokenizer, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "old"]
    assert [p.name for p in old.iterdir()] == ["manifest.json"]
    assert (old / "manifest.json").read_text() == "previous run"


def test_success_replaces_old_output(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.bin").write_text("x")
    cfg = DataConfig(sources=_sources(tmp_path))
    tokenize_corpus(cfg, tokenizer, out)
    assert not (out / "stale.bin").exists() and (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code", "en", "out", "zh.jsonl.gz"]


def test_iter_corpus_yields_every_source_in_order(tmp_path: Path) -> None:
    cfg = DataConfig(sources=_sources(tmp_path))
    pairs = list(iter_corpus(cfg))
    assert [t for _, t in pairs] == ENGLISH + CHINESE + CODE
    assert [n for n, _ in pairs[:1] + pairs[-1:]] == ["english", "code"]


def test_default_demo_sources_total_about_one_and_a_half_megabytes() -> None:
    cfg = DataConfig()
    assert [s.path for s in cfg.sources] == ["builtin:english", "builtin:chinese", "builtin:code"]
    total = sum(len(t.encode("utf-8")) for _, t in iter_corpus(cfg))
    assert 1_300_000 < total < 1_700_000


def test_duplicate_source_names_are_rejected() -> None:
    source = SourceConfig(name="a", path="x.jsonl")
    with pytest.raises(DataError, match="unique names"):
        DataConfig(sources=(source, source))


def test_one_document_corpus_is_refused_before_training(
    tmp_path: Path, tokenizer: TextTokenizer
) -> None:
    (tmp_path / "book.txt").write_text("a whole book in one file " * 100)
    cfg = DataConfig(sources=(SourceConfig(name="book", path=str(tmp_path / "book.txt")),))
    with pytest.raises(DataError, match=r"1 document\(s\) after cleaning.* one document per line"):
        tokenize_corpus(cfg, tokenizer, tmp_path / "shards")
    assert not (tmp_path / "shards").exists()


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


def test_worker_processes_write_the_same_shards(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    sources = _sources(tmp_path)
    one = tokenize_corpus(
        DataConfig(sources=sources, workers=1, batch_docs=4), tokenizer, tmp_path / "one"
    )
    two = tokenize_corpus(
        DataConfig(sources=sources, workers=2, batch_docs=4), tokenizer, tmp_path / "two"
    )
    assert one == two
    assert _shard_bytes(tmp_path / "one") == _shard_bytes(tmp_path / "two")


def test_cleaning_and_dedup_drops_are_counted_per_source(
    tmp_path: Path, tokenizer: TextTokenizer
) -> None:
    docs = ["a fine document about cats", "tiny", "a fine document about cats", "ok " * 20]
    docs += ["另一个中文文档，完全不同。" * 3, ""]  # an empty text is read and dropped too
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": docs[0]}) + "\n")  # across sources
    cfg = DataConfig(
        sources=(
            SourceConfig(name="a", path=str(tmp_path / "a.jsonl")),
            SourceConfig(name="b", path=str(tmp_path / "b.jsonl")),
        ),
        clean=CleanConfig(min_chars=10, languages=("en",)),
        heldout_fraction=0.5,
    )
    manifest = tokenize_corpus(cfg, tokenizer, tmp_path / "out")
    a, b = manifest["sources"]["a"], manifest["sources"]["b"]
    assert a["dropped"] == {"empty": 1, "exact_duplicate": 1, "language": 1, "too_short": 1}
    assert a["read"] == 6 and a["train"]["docs"] + a["val"]["docs"] == 2
    assert b["dropped"] == {"exact_duplicate": 1} and b["train"]["docs"] + b["val"]["docs"] == 0


def test_near_duplicates_are_dropped_when_asked(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    base = " ".join(f"word{i} of a long and fairly distinctive sentence" for i in range(60))
    near = base.replace("word7 ", "wordseven ").replace("word30 ", "word-thirty ")
    other = " ".join(f"token{i} in quite another text altogether" for i in range(60))
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in [base, near, other])
    )
    source = SourceConfig(name="a", path=str(tmp_path / "a.jsonl"))
    cfg = DataConfig(sources=(source,), dedup=DedupConfig(near=True), heldout_fraction=0.5)
    manifest = tokenize_corpus(cfg, tokenizer, tmp_path / "near")
    assert manifest["sources"]["a"]["dropped"] == {"near_duplicate": 1}
    exact_only = tokenize_corpus(
        dataclasses.replace(cfg, dedup=DedupConfig()), tokenizer, tmp_path / "exact"
    )
    assert exact_only["sources"]["a"]["dropped"] == {}


def test_on_error_skip_writes_rejects_and_keeps_good_documents(
    tmp_path: Path, tokenizer: TextTokenizer
) -> None:
    good = [f"good document {i}" for i in range(6)]
    lines = [json.dumps({"text": t}) for t in good[:3]] + ['{"text": "cut']
    lines += [json.dumps({"body": "no text"})] + [json.dumps({"text": t}) for t in good[3:]]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    source = SourceConfig(name="a", path=str(tmp_path / "a.jsonl"))
    cfg = DataConfig(sources=(source,), heldout_fraction=0.5)
    with pytest.raises(DataError, match=r"a.jsonl:4: malformed JSON"):
        tokenize_corpus(cfg, tokenizer, tmp_path / "strict")
    manifest = tokenize_corpus(
        dataclasses.replace(cfg, on_error="skip"), tokenizer, tmp_path / "out"
    )
    assert manifest["sources"]["a"]["dropped"] == {"bad_input": 2}
    assert Counter(
        _decoded(tmp_path / "out", "train", tokenizer)
        + _decoded(tmp_path / "out", "val", tokenizer)
    ) == Counter(good)
    rejects = [json.loads(r) for r in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["error"].split(": ")[0] for r in rejects] == [
        f"{tmp_path}/a.jsonl:4",
        f"{tmp_path}/a.jsonl:5",
    ]


class _Interrupt(Exception):
    pass


def test_interrupted_run_continues_after_its_finished_shards(
    tmp_path: Path, tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = DataConfig(sources=_sources(tmp_path), shard_tokens=150, batch_docs=3, workers=1)
    straight = tokenize_corpus(cfg, tokenizer, tmp_path / "straight")

    processed: list[int] = []
    real_process = tokenize_workers.process_batch

    def counting(batch: list[str]) -> list:
        processed.append(len(batch))
        if sum(processed) > 65:
            raise _Interrupt  # e.g. a kill, in the middle of the chinese source
        return real_process(batch)

    monkeypatch.setattr(tokenize_workers, "process_batch", counting)
    with pytest.raises(_Interrupt):
        tokenize_corpus(cfg, tokenizer, tmp_path / "out")
    partial = tmp_path / "out.partial"
    progress = json.loads((partial / "progress.json").read_text())
    assert progress["read"]["english"] == len(ENGLISH) and 0 < progress["read"]["chinese"] < 25
    assert not (tmp_path / "out").exists()

    processed.clear()
    monkeypatch.setattr(
        tokenize_workers, "process_batch", lambda b: processed.append(len(b)) or real_process(b)
    )
    # what only the loader reads (weights, epochs) may change between the two runs
    weighted = tuple(dataclasses.replace(s, weight=2.0, max_epochs=1.0) for s in cfg.sources)
    resumed = tokenize_corpus(
        dataclasses.replace(cfg, sources=weighted), tokenizer, tmp_path / "out"
    )
    for name, counts in straight["sources"].items():
        assert resumed["sources"][name]["train"] == counts["train"], name
        assert resumed["sources"][name]["val"] == counts["val"], name
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "straight")
    done = progress["read"]["english"] + progress["read"]["chinese"]
    assert sum(processed) == len(ENGLISH + CHINESE + CODE) - done  # finished work not redone
    assert not partial.exists()


def test_damaged_or_stale_restart_point_starts_over(
    tmp_path: Path, tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = DataConfig(sources=_sources(tmp_path), shard_tokens=150, batch_docs=3, workers=1)
    straight = tokenize_corpus(cfg, tokenizer, tmp_path / "straight")
    real_process = tokenize_workers.process_batch

    def interrupt_late(batch: list[str]) -> list:
        if any("def f5" in t for t in batch):
            raise _Interrupt
        return real_process(batch)

    for damage in ("shard", "config"):
        monkeypatch.setattr(tokenize_workers, "process_batch", interrupt_late)
        with pytest.raises(_Interrupt):
            tokenize_corpus(cfg, tokenizer, tmp_path / damage)
        partial = tmp_path / f"{damage}.partial"
        monkeypatch.setattr(tokenize_workers, "process_batch", real_process)
        if damage == "shard":
            victim = sorted(partial.glob("train_english_*.bin"))[0]
            victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
            assert tokenize_corpus(cfg, tokenizer, tmp_path / damage) == straight
        else:
            other = dataclasses.replace(cfg, heldout_fraction=0.5)
            manifest = tokenize_corpus(other, tokenizer, tmp_path / damage)
            assert manifest["heldout_fraction"] == 0.5
            assert manifest == tokenize_corpus(other, tokenizer, tmp_path / "fresh")


def test_a_restart_sees_edits_to_local_hf_inputs(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    """An interrupted run restarts only with unchanged inputs; `hf:<local folder or file>`
    counts its files as a plain path does (it used to be the string alone)."""
    from lmforge.data.tokenize import _fingerprint

    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"text": "old"}) + "\n")
    for spec in (f"hf:{folder}", f"hf:{folder}:train", f"hf:{folder / 'a.jsonl'}"):
        cfg = DataConfig(sources=(SourceConfig(name="s", path=spec),))
        before = _fingerprint(cfg, tokenizer)
        (folder / "a.jsonl").write_text(json.dumps({"text": "new and longer"}) + "\n")
        assert _fingerprint(cfg, tokenizer) != before, spec
    hub = DataConfig(sources=(SourceConfig(name="s", path="hf:some/dataset:train"),))
    assert _fingerprint(hub, tokenizer) == _fingerprint(hub, tokenizer)


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_worker_processes_end_when_the_tokenize_is_killed(tmp_path: Path) -> None:
    """SIGKILL of the process that started them (pre-emption, OOM killer) used to leave its
    spawn workers waiting on their queues for good."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from lmforge.data.clean import CleanConfig\n"
        "from lmforge.data.dedup import DedupConfig\n"
        "from lmforge.data.tokenize_workers import Workers\n"
        "from lmforge.data.tokenizer import TokenizerConfig, train_tokenizer\n"
        "if __name__ == '__main__':\n"
        "    tok = train_tokenizer(['some text'] * 20, TokenizerConfig(vocab_size=300))\n"
        "    with Workers(CleanConfig(), DedupConfig(), 0.1, 2, tok) as w:\n"
        "        list(w.map([(0, ['a b c']), (1, ['d e f'])]))\n"
        "        print(*w.pool._processes, flush=True)\n"  # type: ignore[union-attr]
        "        time.sleep(600)\n"
    )
    with subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True
    ) as parent:
        try:
            assert parent.stdout is not None
            workers = [int(pid) for pid in parent.stdout.readline().split()]
            assert len(workers) == 2
        finally:
            parent.kill()
    deadline = time.time() + 20
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:  # end them anyway, then fail
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers outlived their killed parent: {left}"


def _alive(pid: int) -> bool:
    """Running (a zombie awaiting its reaper counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
