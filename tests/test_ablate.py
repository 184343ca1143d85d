"""Ablations: every variant × seed trained on shared data, paired differences, resumable."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from lmforge import pipeline
from lmforge.ablate import load_spec, run_ablation
from lmforge.recipe import RecipeError
from tests.conftest import TINY_OVERRIDES

SPEC = {
    "name": "masking",
    "overrides": [*TINY_OVERRIDES, "train.max_tokens=2048", "eval.every_steps=2"],
    "seeds": [1, 2],
    "variants": {
        "eos_reset": ["packing.document_masking=true"],
        "plain_causal": ["packing.document_masking=false"],
    },
    "metrics": ["val_loss", "english.loss"],
}


def write_spec(tmp_path: Path, **changes: object) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, **changes}, allow_unicode=True))
    return path


def test_paired_variants_share_data_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_spec(write_spec(tmp_path))
    out = run_ablation(spec, tmp_path / "out")
    assert len(list((tmp_path / "out").glob("data-*"))) == 1  # one tokenizer + shards for all
    runs = {(r["variant"], r["seed"]): r["metrics"] for r in out["runs"]}
    assert len(runs) == 4 and all(len(r["curve"]) == 2 for r in out["runs"])
    causal = out["variants"]["plain_causal"]["val_loss"]
    diffs = [runs["plain_causal", s]["val_loss"] - runs["eos_reset", s]["val_loss"] for s in (1, 2)]
    assert causal["diff_vs_eos_reset"]["mean"] == pytest.approx(statistics.fmean(diffs))
    assert causal["mean"] == pytest.approx(
        statistics.fmean([runs["plain_causal", s]["val_loss"] for s in (1, 2)])
    )
    assert runs["eos_reset", 1] != runs["eos_reset", 2]  # seeds differ
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert "| plain_causal |" in table and "Δ" in table
    assert (tmp_path / "out" / "ablation.png").stat().st_size > 10_000

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(pipeline, "pretrain_stage", no_training)
    again = run_ablation(spec, tmp_path / "out")
    assert json.dumps(again["variants"]) == json.dumps(out["variants"])

    # a task added later is scored on the finished runs' checkpoints, not retrained
    copa = tmp_path / "tasks" / "copa"
    copa.mkdir(parents=True)
    rows = [
        {"premise": "The man turned on the faucet.", "choice1": "The sink filled.",
         "choice2": "The door shut.", "question": "effect", "idx": i, "label": i % 2}
        for i in range(6)
    ]  # fmt: skip
    (copa / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from lmforge.cli import main

    argv = ["ablate", str(write_spec(tmp_path)), "--out", str(tmp_path / "out")]
    assert main([*argv, "--tasks", "copa", "--data-dir", str(tmp_path / "tasks")]) == 0
    scored = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert all(0 <= r["metrics"]["copa.acc"] <= 1 for r in scored["runs"])
    assert scored["variants"]["eos_reset"]["val_loss"] == out["variants"]["eos_reset"]["val_loss"]
    # scored again, not reused, when how the tasks are scored changes
    assert (
        main([*argv, "--tasks", "copa", "--data-dir", str(tmp_path / "tasks"), "--limit", "3"]) == 0
    )
    rescored = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert {r["scoring"]["limit"] for r in rescored["runs"]} == {3}
    # a variant whose recipe changed since it was trained is refused, not passed off as done
    changed = dict(SPEC["variants"], eos_reset=["packing.document_masking=true", "optim.lr=1e-3"])  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match=r"eos_reset/seed1: trained with another recipe"):
        run_ablation(load_spec(write_spec(tmp_path, variants=changed)), tmp_path / "out")


def test_a_diverged_run_is_summarized_not_a_crash(tmp_path: Path) -> None:
    from lmforge.ablate import RunResult, markdown, plot, summarize

    spec = load_spec(write_spec(tmp_path))
    results = [
        RunResult(variant=v, seed=s, run_dir="", metrics={"val_loss": loss, "english.loss": 2.0})
        for v, s, loss in (
            ("eos_reset", 1, 3.0),
            ("eos_reset", 2, 3.1),
            ("plain_causal", 1, float("nan")),
            ("plain_causal", 2, float("inf")),
        )
    ]
    summary = summarize(spec, results)
    causal = summary["variants"]["plain_causal"]["val_loss"]
    assert math.isnan(causal["std"]) and math.isnan(causal["diff_vs_eos_reset"]["std"])
    assert summary["variants"]["eos_reset"]["val_loss"]["std"] == pytest.approx(0.0707, abs=1e-4)
    assert "| plain_causal | nan ± nan" in markdown(summary, spec)
    for order in (results, results[::-1]):  # the same whatever order the seeds come in
        row = summarize(spec, order)["variants"]["plain_causal"]["val_loss"]
        assert math.isnan(row["min"]) and math.isnan(row["max"])
    plot(summary, results, spec, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 0


def test_bad_specs_are_named(tmp_path: Path) -> None:
    with pytest.raises(
        RecipeError, match="spec.yaml: recipe: an ablation needs at least two variants"
    ):
        load_spec(write_spec(tmp_path, variants={"one": []}))
    with pytest.raises(RecipeError, match="spec.yaml: seed: unknown key"):
        load_spec(write_spec(tmp_path, seed=[1]))
    spec = load_spec(write_spec(tmp_path, metrics=["val_loss", "klingon.loss"], seeds=[1]))
    with pytest.raises(RecipeError, match=r"metrics \['klingon.loss'\] not measured"):
        run_ablation(spec, tmp_path / "bad")


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "recipes" / "ablations").glob("*.yaml")), ids=str
)
def test_shipped_specs_resolve_every_variant(path: Path, tmp_path: Path) -> None:
    from lmforge.ablate import data_key, run_recipe

    spec = load_spec(path)
    recipes = [run_recipe(spec, v, 1, tmp_path) for v in spec.variants]
    totals = {r.resolved_stages()[-1].end for r in recipes}
    assert len(totals) == 1  # equal token budgets
    assert len({data_key(r) for r in recipes}) == 1  # the same tokenizer and shards


def test_ablate_verb_prints_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmforge import ablate
    from lmforge.cli import main

    given = []

    def fake(spec: ablate.AblationSpec, root: object) -> dict:
        given.append(spec)
        return {"reference": "eos_reset", "variants": {}}

    monkeypatch.setattr(ablate, "run_ablation", fake)
    assert main(["ablate", str(write_spec(tmp_path)), "--out", str(tmp_path / "o")]) == 0
    assert "## masking" in capsys.readouterr().out
    spec = [str(write_spec(tmp_path)), "--out", str(tmp_path / "o")]
    assert main(["ablate", *spec, "--limit", "20", "--data-dir", "d"]) == 0  # without --tasks
    assert (given[-1].limit, given[-1].data_dir) == (20, "d")
    assert main(["ablate", str(tmp_path / "missing.yaml")]) == 2
