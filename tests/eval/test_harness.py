"""lm-eval parity: our adapter's answers equal lm-eval's own HF model on the exported checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lmforge import pipeline
from lmforge.checkpoint_dirs import latest_checkpoint
from lmforge.recipe import load_recipe
from tests.conftest import TINY_OVERRIDES

lm_eval = pytest.importorskip("lm_eval")

REQUESTS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: What is the capital of France?\nAnswer:", " a large city in Europe"),
    ("The Python language reference describes ", "the syntax"),
    ("中国人民", "的生活"),
    ("def main(", "):\n    return 0"),
    ("x" * 300, " truncated context"),  # longer than the model's 64-token window
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, prepared_run: Path) -> tuple[Path, Path]:
    import shutil

    run_dir = tmp_path_factory.mktemp("harness") / "run"
    shutil.copytree(prepared_run, run_dir)
    recipe = load_recipe(None, [*TINY_OVERRIDES, f"run_dir={run_dir}", "train.precision=fp32"])
    pipeline.pretrain_stage(recipe)
    hf = pipeline.export_stage(recipe)
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None
    return checkpoint, hf


def _instances(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_equal_lm_evals_hf_model(trained: tuple[Path, Path]) -> None:
    from lm_eval.models.huggingface import HFLM

    from lmforge.eval.harness import LmforgeLM

    checkpoint, hf = trained
    ours = LmforgeLM(checkpoint=str(checkpoint))
    theirs = HFLM(
        pretrained=str(hf), add_bos_token=True, dtype="float32", batch_size=4, device="cpu"
    )
    a = ours.loglikelihood(_instances("loglikelihood", REQUESTS))
    b = theirs.loglikelihood(_instances("loglikelihood", REQUESTS))
    for (lp_a, greedy_a), (lp_b, greedy_b) in zip(a, b, strict=True):
        assert math.isclose(lp_a, lp_b, abs_tol=1e-3) and greedy_a == greedy_b

    # rolling windows already start with lm-eval's prefix token (BOS); with the tokenizer also
    # adding one, lm-eval's HF model would score the text after two BOS: compare without that.
    # One window per forward: lm-eval's padded batches of windows moved this sum by 0.24 nats
    # (1e-4) from the exact per-window value, which ours and lm-eval at batch size 1 both give
    plain = HFLM(
        pretrained=str(hf), add_bos_token=False, dtype="float32", batch_size=1, device="cpu"
    )
    texts = [("a long document " * 40,), ("短文。",)]
    rolled_a = ours.loglikelihood_rolling(_instances("loglikelihood_rolling", texts))
    rolled_b = plain.loglikelihood_rolling(_instances("loglikelihood_rolling", texts))
    for x, y in zip(rolled_a, rolled_b, strict=True):
        assert math.isclose(x, y, rel_tol=1e-4)


def test_greedy_generation_equals_lm_evals_hf_model(trained: tuple[Path, Path]) -> None:
    from lm_eval.models.huggingface import HFLM

    from lmforge.eval.harness import LmforgeLM

    checkpoint, hf = trained
    theirs = HFLM(
        pretrained=str(hf), add_bos_token=True, dtype="float32", batch_size=1, device="cpu"
    )
    args = [("def main(", {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False})]
    args += [("The ", {"until": ["."], "max_gen_toks": 12})]
    args += [(context, {"until": ["\n", "。"], "max_gen_toks": 16}) for context, _ in REQUESTS[:5]]
    args += [("中国", {"until": "人", "max_gen_toks": 6})]
    long = " ".join(f"{c} {i}" for i, (c, _) in enumerate(REQUESTS[:5] * 3))  # over 64 tokens
    args += [(long, {"until": ["\n"], "max_gen_toks": 12})]  # cut to its last 64 - 12 tokens
    expected = theirs.generate_until(_instances("generate_until", args))
    for batch_size in (1, 4):  # batches: left-padded contexts of different lengths
        ours = LmforgeLM(checkpoint=str(checkpoint), batch_size=batch_size)
        assert ours.generate_until(_instances("generate_until", args)) == expected
    with pytest.raises(ValueError, match="batch_size: a positive integer or 'auto', got 'x'"):
        LmforgeLM(checkpoint=str(checkpoint), batch_size="x")


def test_generate_until_cuts_long_contexts_from_the_left(
    trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """lm-eval's HF model keeps the last max_length - max_gen_toks context tokens (BOS first,
    so a cut drops it); the trained model here says the same whatever the context, so the
    prompts that reach generate_batch are checked instead."""
    import lmforge.eval.harness as harness

    ours = harness.LmforgeLM(checkpoint=str(trained[0]), batch_size=2)
    seen: list[list[int]] = []

    def spy(model: object, prompts: list[list[int]], *args: object) -> list[list[int]]:
        seen.extend(prompts)
        return [[] for _ in prompts]

    monkeypatch.setattr(harness, "generate_batch", spy)
    long, short = "the quick brown fox " * 30, "def main("
    ours.generate_until(
        _instances("generate_until", [(c, {"max_gen_toks": 12}) for c in (short, long)])
    )
    tok = ours.tokenizer
    assert ours.max_length == 64
    assert seen == [[tok.bos_id, *tok.encode(long)][-52:], [tok.bos_id, *tok.encode(short)]]
    with pytest.raises(ValueError, match="max_gen_toks 64 leaves no room"):
        ours.generate_until(_instances("generate_until", [(short, {"max_gen_toks": 64})]))


EVAL_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval"


def test_accuracies_equal_lm_eval_on_the_export(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """End to end: `run_suite` on the checkpoint vs lm-eval's `simple_evaluate` on the export,
    same local data: ARC-Easy zero-shot and two MMLU subjects 5-shot, cut to the 64-token
    window. One lm-eval run for all three (its task index alone takes seconds to build)."""
    if not EVAL_DATA.is_dir():
        pytest.skip(f"{EVAL_DATA} not found (the shared benchmark data is not on this machine)")
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from benchmarks.eval_parity import lm_eval_tasks
    from lmforge.data.tokenizer import TextTokenizer
    from lmforge.eval.suite import SuiteConfig, run_suite

    checkpoint, hf = trained
    tasks = lm_eval_tasks("arc_easy", [], str(EVAL_DATA), tmp_path)
    tasks |= lm_eval_tasks("mmlu", ["anatomy", "virology"], str(EVAL_DATA), tmp_path)
    model, _ = pipeline.load_trained(checkpoint)
    tokenizer = TextTokenizer.load(checkpoint.parent.parent / "tokenizer.json")
    cfg = SuiteConfig(tasks=tuple(tasks), data_dir=str(EVAL_DATA), limit=30, max_length=64)
    ours = run_suite(model, tokenizer, torch.device("cpu"), cfg)["tasks"]
    lm = HFLM(pretrained=str(hf), dtype="float32", batch_size=8, device="cpu")
    theirs = simple_evaluate(
        model=lm,
        tasks=list(tasks.values()),
        task_manager=TaskManager(include_path=str(tmp_path)),
        limit=30,
    )["results"]
    assert [ours[n]["num_fewshot"] for n in tasks] == [0, 5, 5]
    for name, local in tasks.items():
        assert ours[name]["n"] == 30
        assert ours[name]["acc"] == theirs[local]["acc,none"]
        assert ours[name]["acc_norm"] == theirs[local]["acc_norm,none"]
