"""The `lmforge` command end to end: the demo at a tiny size, and clear errors on bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.export import import_hf
from lmforge.logs import read_metrics
from tests.conftest import TINY_OVERRIDES


def test_demo_runs_every_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "demo"
    assert main(["demo", *TINY_OVERRIDES, f"run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "### sample: '中国人民'" in out and "### sample: 'def main('" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["val_bpb"] > 0 and len(summary["samples"]) == 3
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tok_per_s", "mfu"} <= set(metrics[-1])
    assert "val_loss" in metrics[-1]
    for name in (
        "tokenizer.json",
        "recipe.yaml",
        "eval.json",
        "shards/manifest.json",
        "hf/config.json",
        "hf/model.safetensors",
        "hf/tokenizer.json",
    ):
        assert (run_dir / name).exists(), name

    evaluation = json.loads((run_dir / "eval.json").read_text())
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    parts = [n for n, c in manifest["sources"].items() if c["val"]["docs"]]
    assert len(parts) >= 2 and all(evaluation[n]["bpb"] > 0 for n in parts)
    assert sum(evaluation[n]["tokens"] for n in parts) == evaluation["val_tokens"]

    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(run_dir / "hf").eval()
    ours = import_hf(run_dir / "hf")
    ids = torch.randint(0, 512, (1, 24))
    torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


def test_verbs_run_one_stage_each(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [*TINY_OVERRIDES, f"run_dir={tiny_run}"]
    assert main(["pretrain", *args, "train.max_tokens=1024"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    assert main(["eval", *args]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["val_tokens"] > 0
    assert main(["generate", *args, "--prompt", "def f("]) == 0
    assert "### def f(" in capsys.readouterr().out
    assert main(["export", *args, "--out", str(tiny_run / "exported")]) == 0
    assert (tiny_run / "exported" / "config.json").exists()
    half = tiny_run / "exported-bf16"
    assert main(["export", *args, "--dtype", "bf16", "--out", str(half)]) == 0
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    weights = load_file(str(half / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_eval_by_position_writes_the_long_context_curve(
    tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*TINY_OVERRIDES, f"run_dir={tiny_run}"]
    assert main(["pretrain", *args, "train.max_tokens=1024"]) == 0
    capsys.readouterr()
    assert main(["eval", *args, "--by-position", "128"]) == 0  # twice the training length
    printed = capsys.readouterr().out
    assert "positions     64-127" in printed and f"plot: {tiny_run}/loss_by_position.png" in printed
    out = json.loads((tiny_run / "loss_by_position.json").read_text())
    assert len(out["loss"]) == 128 and out["train_seq_len"] == 64
    assert (tiny_run / "loss_by_position.png").stat().st_size > 1000


def test_data_inspect_shows_shares_epochs_and_marked_rows(
    tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*TINY_OVERRIDES, f"run_dir={tiny_run}"]
    assert main(["data-inspect", *args, "--json", "train.max_tokens=200000"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["sources"]) == {"english", "chinese", "code"}
    assert abs(sum(info["target_share"].values()) - 1) < 1e-9
    planned = info["planned"]
    assert sum(p["tokens"] for p in planned.values()) == 391 * 512  # whole steps, no more
    for name, p in planned.items():  # natural weights: planned shares follow the targets
        assert abs(p["share"] - info["target_share"][name]) < 0.03, name
        assert p["epochs"] > 5
    assert "realised" not in info and all(row.startswith("▌") for row in info["rows"])
    assert main(["pretrain", *args, "train.max_tokens=1024"]) == 0
    capsys.readouterr()
    assert main(["data-inspect", *args]) == 0
    out = capsys.readouterr().out
    assert "| source | train docs |" in out and "realised share" in out
    assert "packed row 1" in out and "▌<|bos|>" in out


def test_data_inspect_lists_a_source_the_mixture_never_draws(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A weight-0 source with no train documents has no planned row: a share of 0, not a
    KeyError."""
    from lmforge import pipeline

    counts = {"train_docs": 0, "train_tokens": 0, "val_tokens": 9, "dropped": {}}
    info = {
        "sources": {"a": {**counts, "train_docs": 5}, "b": counts},
        "target_share": {"a": 1.0, "b": 0.0},
        "planned": {"a": {"share": 1.0, "epochs": 2.0}},
        "rows": [],
    }
    monkeypatch.setattr(pipeline, "inspect_stage", lambda *a, **k: info)
    assert main(["data-inspect", *TINY_OVERRIDES]) == 0
    assert "| b | 0 | 0 | 9 | - | 0.0000 | 0.0000 | 0.0000 |" in capsys.readouterr().out


def test_tokenizer_report_compares_with_a_reference(
    tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*TINY_OVERRIDES, f"run_dir={tiny_run}"]
    reference = tiny_run / "reference" / "tokenizer.json"
    reference.parent.mkdir()
    reference.write_text((tiny_run / "tokenizer.json").read_text())
    assert main(["tokenizer-report", *args, "--reference", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "lmforge" in out and "reference" in out
    report = json.loads((tiny_run / "tokenizer_report" / "tokenizer_report.json").read_text())
    by_name: dict[str, list[float]] = {}
    for row in report["rows"]:
        by_name.setdefault(row["tokenizer"], []).append(row["bytes_per_token"])
    assert by_name["lmforge"] == by_name["reference"]  # the same tokenizer compresses the same
    assert (tiny_run / "tokenizer_report" / "tokenizer_report.png").stat().st_size > 1000
    assert main(["tokenizer-report", *args, "--reference", str(tiny_run / "nope.model")]) == 2
    assert "nope.model" in capsys.readouterr().err


def test_tokenizer_report_scores_the_documents_the_shards_hold_out(tiny_run: Path) -> None:
    """A recipe edited after tokenize (another heldout_fraction) still reports on the shards'
    held-out documents, not on others the training read."""
    args = [*TINY_OVERRIDES, f"run_dir={tiny_run}"]
    report = tiny_run / "tokenizer_report" / "tokenizer_report.json"
    assert main(["tokenizer-report", *args]) == 0
    as_tokenized = json.loads(report.read_text())["rows"]
    assert main(["tokenizer-report", *args, "data.heldout_fraction=0.5"]) == 0
    assert json.loads(report.read_text())["rows"] == as_tokenized


def test_unknown_recipe_key_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  num_layer: 2\n")
    assert main(["pretrain", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "r.yaml: model.num_layer: unknown key" in err


def test_malformed_corpus_names_the_line_and_leaves_no_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    run = tmp_path / "run"
    args = [f"run_dir={run}", "tokenizer.vocab_size=300", "--corpus", str(corpus)]
    assert main(["train-tokenizer", *args]) == 2
    assert f"{corpus}:3" in capsys.readouterr().err
    assert not (run / "tokenizer.json").exists() and not (run / "shards").exists()


def test_invalid_utf8_corpus_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(b"caf\xc3 ok\n")
    assert main(["train-tokenizer", f"run_dir={tmp_path}", "--corpus", str(corpus)]) == 2
    assert "bad.txt" in capsys.readouterr().err


def test_truncated_shard_and_checkpoint_are_named(
    tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*TINY_OVERRIDES, f"run_dir={tiny_run}"]
    assert main(["pretrain", *args, "train.max_tokens=512"]) == 0
    weights = next((tiny_run / "checkpoints").glob("step_*")) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["eval", *args]) == 2
    assert "model.safetensors: truncated" in capsys.readouterr().err
    shard = tiny_run / "shards" / "train_english_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-8])
    assert main(["pretrain", "--resume", *args]) == 2
    err = capsys.readouterr().err
    assert "train_english_00000.bin" in err and "truncated" in err


def test_shards_from_another_tokenizer_are_refused(
    tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*TINY_OVERRIDES, f"run_dir={tiny_run}", "tokenizer.vocab_size=400"]
    assert main(["train-tokenizer", *args]) == 0  # a new tokenizer, the old shards
    assert main(["pretrain", *args]) == 2
    assert "written with another tokenizer" in capsys.readouterr().err


def test_fresh_pretrain_never_overwrites_an_earlier_run(
    tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*TINY_OVERRIDES, f"run_dir={tiny_run}", "train.max_tokens=1024"]
    assert main(["pretrain", *args]) == 0
    before = sorted(p.name for p in (tiny_run / "checkpoints").iterdir())
    assert main(["pretrain", *args]) == 2
    assert "pretrain --resume" in capsys.readouterr().err
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir()) == before
    assert main(["pretrain", "--resume", *args]) == 0  # already complete: nothing to do


def test_command_line_tokenize_with_worker_processes(prepared_run: Path) -> None:
    """`python -m lmforge tokenize` with spawned worker processes, as a user runs it."""
    run_dir = prepared_run.parent / "module_run"
    run_dir.mkdir()
    shutil.copy(prepared_run / "tokenizer.json", run_dir / "tokenizer.json")
    cmd = [sys.executable, "-m", "lmforge", "tokenize", *TINY_OVERRIDES, f"run_dir={run_dir}"]
    result = subprocess.run(
        [*cmd, "data.workers=2"], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    a = json.loads((run_dir / "shards" / "manifest.json").read_text())
    b = json.loads((prepared_run / "shards" / "manifest.json").read_text())
    assert a == b  # 2 worker processes write what 1 in-process worker wrote


EVAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"


def test_eval_tasks_scores_benchmarks_and_writes_tables(
    tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not EVAL_DATA.is_dir():
        pytest.skip(f"{EVAL_DATA} not found (the shared benchmark data is not on this machine)")
    args = [*TINY_OVERRIDES, f"run_dir={tiny_run}"]
    assert main(["pretrain", *args, "train.max_tokens=1024"]) == 0
    capsys.readouterr()
    tasks = "arc_easy,copa,winogrande,mmlu_anatomy,humaneval"
    assert (
        main(["eval", *args, "--tasks", tasks, "--data-dir", str(EVAL_DATA), "--limit", "8"]) == 0
    )
    out = capsys.readouterr().out
    assert "| arc_easy | 8 | 0 |" in out and "| mmlu_anatomy | 8 | 5 |" in out
    assert "commonsense average** (3 tasks)" in out
    result = json.loads((tiny_run / "benchmarks.json").read_text())
    humaneval = result["tasks"].pop("humaneval")
    assert humaneval["n"] == 8 and humaneval["pass@1"] == 0.0  # a 1,024-token model writes no code
    for r in result["tasks"].values():
        assert 0 <= r["acc"] <= 1 and r["n"] == 8
    sample_args = ["--tasks", "humaneval", "--samples", "3", "--data-dir", str(EVAL_DATA)]
    assert main(["eval", *args, *sample_args, "--limit", "2"]) == 0
    sampled = json.loads((tiny_run / "benchmarks.json").read_text())["tasks"]["humaneval"]
    assert sampled["samples"] == 3 and sampled["n"] == 2 and "pass@1" in sampled
    assert "pass@10" not in sampled  # k above the number of samples is not estimable
    capsys.readouterr()
    assert main(["eval", *args, "--tasks", "no_such_task"]) == 2
    assert "no_such_task" in capsys.readouterr().err


def test_eval_needle_writes_the_grid_and_heatmap(
    tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*TINY_OVERRIDES, f"run_dir={tiny_run}"]
    assert main(["pretrain", *args, "train.max_tokens=1024"]) == 0
    capsys.readouterr()
    grid = ["--depths", "0,50,100", "--samples", "2"]
    assert main(["eval", *args, "--needle", "192,256", "--passkey", *grid]) == 0
    out = capsys.readouterr().out
    assert "| depth \\ length | 192 | 256 |" in out and "| 50% |" in out
    result = json.loads((tiny_run / "needle_passkey.json").read_text())
    assert result["lengths"] == [192, 256] and result["depths"] == [0, 50, 100]
    assert len(result["records"]) == 12 and result["train_seq_len"] == 64
    assert (tiny_run / "needle_passkey.png").stat().st_size > 10_000
    assert (tiny_run / "needle_passkey.md").exists()

    haystack = tiny_run / "hay.txt"
    haystack.write_text("A river runs to the sea. The sea is wide.\n" * 50)
    assert main(["eval", *args, "--needle", "--haystack", str(haystack)]) == 0
    result = json.loads((tiny_run / "needle_needle.json").read_text())
    assert result["lengths"] and all(L >= 64 for L in result["lengths"])  # auto, room for hay
    assert len(result["depths"]) == 11

    capsys.readouterr()
    assert main(["eval", *args, "--needle", "8", "--passkey"]) == 2
    assert "length 8 is shorter than the passkey prompt" in capsys.readouterr().err
    assert main(["eval", *args, "--needle", "64,x"]) == 2
    assert "--needle: expected comma-separated numbers" in capsys.readouterr().err


def test_importing_the_cli_leaves_compiler_and_checkpoint_machinery_unloaded() -> None:
    """Verbs that never compile or checkpoint (plan, tokenize, runs, --help) must not pay for
    torch._dynamo (70 MB, 1.4 s) or torch.distributed.checkpoint (45 MB, 1.5 s) at start-up:
    they load when a model is compiled or a checkpoint is written or read."""
    code = (
        "import sys, lmforge.cli, lmforge.serve; "
        "print([m for m in ('torch._dynamo', 'torch.distributed.checkpoint') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tasks", "arc_easy", "--by-position", "128"], "--tasks and --by-position are separate"),
        (["--needle", "--tasks", "piqa"], "--tasks and --needle are separate"),
        (["--passkey", "--depths", "0,50"], "--depths is an option of --needle"),
        (["--haystack", "x.txt"], "--haystack is an option of --needle"),
        (["--limit", "10"], "--limit is an option of --tasks"),
        (["--num-fewshot", "5", "--needle"], "--num-fewshot is an option of --tasks"),
        (["--samples", "4"], "--samples is an option of --tasks"),
    ],
)
def test_eval_options_of_another_evaluation_are_refused(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """They were ignored: `eval --passkey --depths 0,50` without --needle ran perplexity."""
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_run_dir_without_a_recipe_file_uses_its_own_recipe(
    tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pretrain run_dir=R --resume` (or eval, data-inspect...) with no recipe file starts from
    R/recipe.yaml, not the demo defaults, which rewrote a shortened run into a longer one."""
    args = [*TINY_OVERRIDES, f"run_dir={tiny_run}", "train.max_tokens=1024"]
    assert main(["pretrain", *args, "train.stop_at_step=1"]) == 0
    saved = yaml.safe_load((tiny_run / "recipe.yaml").read_text())
    assert main(["pretrain", f"run_dir={tiny_run}", "--resume"]) == 0
    assert "the run's recipe" in capsys.readouterr().err
    now = yaml.safe_load((tiny_run / "recipe.yaml").read_text())
    assert now["train"].pop("stop_at_step") in (0, None) and saved["train"].pop("stop_at_step")
    assert now == saved and now["train"]["max_tokens"] == 1024
    lines = (tiny_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # 1,024 tokens: 2 steps


def test_data_inspect_with_no_rows_prints_the_mixture_only(
    tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data-inspect", *TINY_OVERRIDES, f"run_dir={tiny_run}", "--rows", "0"]) == 0
    assert "english" in capsys.readouterr().out  # the StopIteration traceback before


def test_plan_of_a_recipe_that_starts_from_a_base_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An sft recipe's model is its base run's: a plan of the recipe's own model section
    (the demo's 5M for xgen-7b-inst) must not pass as the 7B's without a word."""
    recipe = Path(__file__).parents[1] / "recipes" / "xgen-7b-inst.yaml"
    assert main(["plan", str(recipe), "--gpus", "1"]) == 0
    assert "train.init_from=runs/xgen-7b supplies the model" in capsys.readouterr().err
