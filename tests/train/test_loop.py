"""The training loop: gradient accumulation is exact, resume in a new process is bit-exact."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge import pipeline
from lmforge.checkpoint_dirs import latest_checkpoint
from lmforge.logs import read_metrics
from lmforge.recipe import load_recipe
from lmforge.report import read_run, run_status, status_row
from tests.conftest import TINY_OVERRIDES


def _pretrain_in_process(run_dir: Path, *overrides: str) -> list[dict]:
    recipe = load_recipe(None, [*TINY_OVERRIDES, f"run_dir={run_dir}", *overrides])
    return pipeline.pretrain_stage(recipe)


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = latest_checkpoint(run_dir / "checkpoints")
    assert last is not None
    return load_file(str(last / "model.safetensors"))


def _sibling_run(run_dir: Path, new: Path) -> Path:
    """A second run dir sharing run_dir's tokenizer and shards, with no checkpoints."""
    new.mkdir()
    for name in ("tokenizer.json", "shards"):
        os.symlink(run_dir / name, new / name)
    return new


def test_grad_accumulation_4x1_equals_1x4(tiny_run: Path, tmp_path: Path) -> None:
    other = _sibling_run(tiny_run, tmp_path / "other")
    common = ["train.precision=fp32", "train.batch_tokens=256", "train.max_tokens=768"]
    a = _pretrain_in_process(tiny_run, *common, "train.micro_batch_size=1")  # 4 micro-steps
    b = _pretrain_in_process(other, *common, "train.micro_batch_size=4")  # 1 micro-step
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) < 1e-5 and ra["tokens"] == rb["tokens"]
    wa, wb = _final_weights(tiny_run), _final_weights(other)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)


def _cli(run_dir: Path, *args: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "pretrain",
        *TINY_OVERRIDES,
        f"run_dir={run_dir}",
        "train.save_every_steps=100",
        *args,
    ]
    env = {**os.environ, "LMFORGE_NO_PROGRESS": "1"}
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)


def test_resume_in_new_process_is_bit_exact(tiny_run: Path, tmp_path: Path) -> None:
    split = _sibling_run(tiny_run, tmp_path / "split")
    _cli(tiny_run)  # 16 steps straight through
    _cli(split, "train.stop_at_step=7")  # 7 steps, checkpoint, exit
    stopped = latest_checkpoint(split / "checkpoints")
    assert stopped is not None and stopped.name == "step_00000007"
    assert json.loads((stopped / "trainer.json").read_text())["data_exhausted"] is False
    assert not run_status(read_run(split))["finished"]
    _cli(split, "--resume")  # the other 9 steps in a new process
    straight = read_metrics(tiny_run / "metrics.jsonl")
    resumed = read_metrics(split / "metrics.jsonl")
    assert len(straight) == 16
    keys = ("step", "tokens", "loss", "lr", "grad_norm", "val_loss")
    assert [[r.get(k) for k in keys] for r in straight] == [
        [r.get(k) for k in keys] for r in resumed
    ]
    wa, wb = _final_weights(tiny_run), _final_weights(split)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


def test_training_lowers_held_out_loss(tmp_path: Path) -> None:
    """On a learnable templated corpus the held-out loss must fall well below its start."""
    rng = random.Random(0)
    names, verbs = ["Alice", "Bob", "Carol", "Dan"], ["reads", "writes", "tests", "ships"]
    docs = [
        " ".join(
            f"{rng.choice(names)} {rng.choice(verbs)} item {rng.randrange(10)}."
            for _ in range(rng.randrange(3, 12))
        )
        for _ in range(400)
    ]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    recipe = load_recipe(
        None,
        [
            *TINY_OVERRIDES,
            f"run_dir={tmp_path / 'run'}",
            "tokenizer.vocab_size=300",
            f"data.sources=[{{name: toy, path: '{corpus}'}}]",
            "train.max_tokens=12288",
        ],
    )
    pipeline.train_tokenizer_stage(recipe)
    pipeline.tokenize_stage(recipe)
    records = pipeline.pretrain_stage(recipe)
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert evals[0] > 2.5 and evals[-1] < evals[0] - 1.0
    assert records[-1]["loss"] < records[0]["loss"] - 2.0


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_training_keeps_freed_memory_unless_told_not_to(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: bool
) -> None:
    from lmforge.train import loop

    calls: list[bool] = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: calls.append(True) or True)
    other = _sibling_run(tiny_run, tmp_path / "other")
    args = ("train.max_tokens=512", "eval.every_steps=0", f"train.keep_freed_memory={keep}")
    _pretrain_in_process(other, "train.device=cpu", *args)
    assert calls == ([True] if keep else [])


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_run: Path, tmp_path: Path) -> None:
    other = _sibling_run(tiny_run, tmp_path / "other")
    common = ["train.precision=fp32", "train.max_tokens=1536", "eval.every_steps=0"]
    eager = _pretrain_in_process(tiny_run, *common)
    compiled = _pretrain_in_process(other, *common, "train.compile=true")
    for a, b in zip(eager, compiled, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * a["loss"]
    assert abs(eager[-1]["val_loss"] - compiled[-1]["val_loss"]) < 1e-4 * eager[-1]["val_loss"]


def test_mixture_weights_and_max_epochs_shape_what_training_reads(
    tiny_run: Path, tmp_path: Path
) -> None:
    sources = ", ".join(
        f"{{name: {name}, path: 'builtin:{name}', max_bytes: 20000, weight: {w}, max_epochs: 0.2}}"
        for name, w in (("english", 1), ("chinese", 0), ("code", 1))
    )
    args = [
        f"data.sources=[{sources}]",
        "train.log_every_steps=1",
        "train.max_tokens=16384",
        "eval.every_steps=1000",  # only at the end, which the data decides
        "train.keep_best=true",
    ]
    records = _pretrain_in_process(tiny_run, *args)
    assert 0 < len(records) < 32  # a fifth of two small sources runs out before 16,384 tokens
    seen = records[-1]["tokens_by_source"]
    assert seen["chinese"] == 0 and seen["english"] > 0 and seen["code"] > 0
    last = latest_checkpoint(tiny_run / "checkpoints")
    assert last is not None and last.name == f"step_{len(records):08d}"
    trainer = json.loads((last / "trainer.json").read_text())
    consumed = trainer["loader"]["consumed"]
    assert [len(v) for v in consumed.values()] == [1, 0, 1]  # nobody reached a second epoch
    # the rows left over (less than a batch) are not trained on, nor counted as read
    assert trainer["loader"]["rows"] * 64 == trainer["tokens"] == records[-1]["tokens"]
    # the step the data ended at is evaluated, logged once, and scores its checkpoint
    assert [r["step"] for r in records if "val_loss" in r] == [len(records)]
    assert read_metrics(tiny_run / "metrics.jsonl") == records
    assert (trainer["val_loss"], trainer["val_seq_len"]) == (records[-1]["val_loss"], 64)
    # it says the data ran out, and `lmforge runs` calls the run finished for that reason
    assert trainer["data_exhausted"] is True
    status = run_status(read_run(tiny_run))
    assert status["finished"] and status["steps"] < status["planned"]
    assert "data exhausted" in status_row(status)
    # stopped at that last step, then resumed: the end is evaluated and scored all the same
    split = _sibling_run(tiny_run, tmp_path / "split")
    _pretrain_in_process(split, *args, f"train.stop_at_step={len(records)}")
    recipe = load_recipe(None, [*TINY_OVERRIDES, f"run_dir={split}", *args])
    assert pipeline.pretrain_stage(recipe, resume=True) == []
    keys = ("step", "tokens", "loss", "val_loss")
    resumed = read_metrics(split / "metrics.jsonl")
    assert [[r.get(k) for k in keys] for r in resumed] == [
        [r.get(k) for k in keys] for r in records
    ]
    again = json.loads((latest_checkpoint(split / "checkpoints") / "trainer.json").read_text())  # type: ignore[operator]
    assert again["val_loss"] == trainer["val_loss"] and again["data_exhausted"]


def test_async_save_writes_the_same_checkpoints(tiny_run: Path, tmp_path: Path) -> None:
    """Optimizer state written in the background while training goes on holds the values of
    its own step, not later ones: every checkpoint equals the synchronous run's."""
    from lmforge.checkpoint import load_checkpoint
    from lmforge.model.llama import Llama
    from lmforge.train.optim import build_optimizer

    other = _sibling_run(tiny_run, tmp_path / "async")
    common = ["train.precision=fp32", "train.save_every_steps=4", "train.max_tokens=4096"]
    _pretrain_in_process(tiny_run, *common)
    _pretrain_in_process(other, *common, "train.async_save=true")
    recipe = load_recipe(None, [*TINY_OVERRIDES, *common])
    for name in ("step_00000004", "step_00000008"):
        states = []
        for run in (tiny_run, other):
            model = Llama(recipe.model)
            opt = build_optimizer(model, recipe.optim)
            state = load_checkpoint(run / "checkpoints" / name, model, opt)  # verifies checksums
            states.append((state.step, model.state_dict(), opt.state_dict()["state"]))
        (step_a, model_a, opt_a), (step_b, model_b, opt_b) = states
        assert step_a == step_b and opt_a.keys() == opt_b.keys()
        for k in model_a:
            assert torch.equal(model_a[k], model_b[k]), k
        for i in opt_a:
            for k, v in opt_a[i].items():
                assert torch.equal(v, opt_b[i][k]), (name, i, k)
    assert not list((other / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("async_save", [False, True])
def test_a_crash_after_a_save_keeps_that_checkpoint(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, async_save: bool
) -> None:
    """The step-4 checkpoint is in place before step 6 fails, not only once the next save
    starts: --resume continues from it."""
    from lmforge.model.llama import Llama

    run_dir = _sibling_run(tiny_run, tmp_path / "crash")
    original, calls = Llama.forward, [0]

    def failing(model: Llama, *args: object, **kwargs: object) -> object:
        if model.training:
            calls[0] += 1
            if calls[0] > 2 * 5:  # two micro-batches a step: step 6
                raise RuntimeError("out of memory")
        return original(model, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Llama, "forward", failing)
    args = ("train.save_every_steps=4", f"train.async_save={async_save}", "train.precision=fp32")
    with pytest.raises(RuntimeError, match="out of memory"):
        _pretrain_in_process(run_dir, *args)
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000004"  # type: ignore[union-attr]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(Llama, "forward", original)
    recipe = load_recipe(None, [*TINY_OVERRIDES, f"run_dir={run_dir}", *args])
    records = pipeline.pretrain_stage(recipe, resume=True)
    assert records[0]["step"] == 5


def test_resume_mends_the_logs_and_the_rng_of_a_killed_run(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill mid-append leaves a last metrics line cut short: resume drops it (a bad line
    elsewhere is an error naming it). Guard events past the checkpoint go with the steps they
    belong to, and the torch RNG continues as in a run never stopped."""
    from lmforge.model.llama import Llama
    from lmforge.train.loop import _truncate_jsonl

    original, rng = Llama.forward, []

    def tapped(model: Llama, *args: object, **kwargs: object) -> object:
        if model.training:
            rng.append(torch.get_rng_state())
        return original(model, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Llama, "forward", tapped)
    args = ("train.save_every_steps=4", "train.precision=fp32")
    straight = _sibling_run(tiny_run, tmp_path / "straight")
    _pretrain_in_process(straight, *args, "train.stop_at_step=8")
    straight_rng, rng[:] = list(rng), []

    run_dir = _sibling_run(tiny_run, tmp_path / "killed")
    _pretrain_in_process(run_dir, *args, "train.stop_at_step=6")
    metrics, events = run_dir / "metrics.jsonl", run_dir / "events.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"step": 7, "loss": 3.')  # the kill, mid-line
    events.write_text('{"step": 3, "kind": "loss_spike"}\n{"step": 7, "kind": "loss_spike"}\n')
    lines = good.splitlines()
    (run_dir / "bad.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]))
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a JSON record"):
        _truncate_jsonl(run_dir / "bad.jsonl", 4)
    rng[:] = []
    overrides = [*TINY_OVERRIDES, f"run_dir={run_dir}", *args, "train.stop_at_step=8"]
    records = pipeline.pretrain_stage(load_recipe(None, overrides), resume=True)
    assert [r["step"] for r in records] == [7, 8]
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, 9))
    assert [json.loads(line)["step"] for line in events.read_text().splitlines()] == [3]
    assert len(rng) == 4 and all(
        torch.equal(a, b) for a, b in zip(rng, straight_rng[-4:], strict=True)
    )


def test_resume_refuses_changed_batch_tokens_and_accepts_more_tokens(
    tiny_run: Path, tmp_path: Path
) -> None:
    """The loop counts steps, the stages count tokens: a resume whose batch size moved step 4
    to other tokens would end early and skip the cooldown; extending the run is fine."""
    run_dir = _sibling_run(tiny_run, tmp_path / "changed")
    args = ("train.precision=fp32", "train.batch_tokens=512", "train.max_tokens=4096")
    _pretrain_in_process(run_dir, *args, "train.stop_at_step=4")
    overrides = [*TINY_OVERRIDES, f"run_dir={run_dir}", *args]
    with pytest.raises(ValueError, match="at step 4 after 2048 tokens, where this recipe's"):
        doubled = load_recipe(None, [*overrides, "train.batch_tokens=1024"])
        pipeline.pretrain_stage(doubled, resume=True)
    longer = load_recipe(None, [*overrides, "train.max_tokens=6144"])
    records = pipeline.pretrain_stage(longer, resume=True)
    assert records[0]["step"] == 5 and records[-1]["tokens"] == 6144


def test_a_trained_run_dir_is_not_rewritten_by_a_rerun(tiny_run: Path) -> None:
    """Without --resume, pretrain, tokenize, train-tokenizer and run refuse a run dir with
    checkpoints before they write anything: its tokenizer, shards and recipe stay the ones
    its checkpoints were trained with."""
    _pretrain_in_process(tiny_run, "train.stop_at_step=2", "train.save_every_steps=2")
    files = sorted(p for p in tiny_run.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    other = load_recipe(None, [*TINY_OVERRIDES, f"run_dir={tiny_run}", "tokenizer.vocab_size=300"])
    stages = (
        pipeline.pretrain_stage,
        pipeline.tokenize_stage,
        pipeline.train_tokenizer_stage,
        pipeline.run_all,
    )
    for stage in stages:
        with pytest.raises(FileExistsError, match="holds checkpoints of a trained run"):
            stage(other)
    assert sorted(p for p in tiny_run.rglob("*") if p.is_file()) == files
    assert all(p.read_bytes() == data for p, data in before.items())


def test_the_last_metrics_line_is_rewritten_by_a_writer_that_did_not_write_it(
    tmp_path: Path,
) -> None:
    """After a rewind the writer is new; the final eval still completes the last step's line."""
    from lmforge.logs import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    first = MetricsWriter(path)
    first.write({"step": 1, "loss": 3.0})
    first.write({"step": 2, "loss": 2.5})
    first.close()
    again = MetricsWriter(path)
    again.rewrite_last({"step": 2, "loss": 2.5, "val_loss": 2.7})
    again.rewrite_last({"step": 2, "loss": 2.5, "val_loss": 2.6})  # its own line, now
    again.close()
    assert read_metrics(path) == [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.5, "val_loss": 2.6},
    ]
