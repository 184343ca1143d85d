"""Every stage of a recipe, in pipeline order; the only package that knows the whole chain.

Stages talk through files in the run directory:
`tokenizer.json` → `shards/` → `checkpoints/step_*/` + `metrics.jsonl` → `eval.json`, `hf/`.
training.py holds the stages up to a trained checkpoint, from_checkpoint.py the ones that start
from one, data_stages.py the ones that look at the data; `run_all` chains them for one recipe.
"""

from __future__ import annotations

import json
from typing import Any

from lmforge.dist import world_size
from lmforge.pipeline.data_stages import inspect_stage, tokenizer_report_stage
from lmforge.pipeline.from_checkpoint import (
    benchmark_stage,
    eval_stage,
    export_stage,
    generate_stage,
    needle_stage,
    position_stage,
)
from lmforge.pipeline.training import (
    RunPaths,
    find_checkpoint,
    initial_checkpoint,
    load_trained,
    mixture_sources,
    pretrain_stage,
    sft_stage,
    tokenize_stage,
    train_tokenizer_stage,
    trained_recipe,
)
from lmforge.recipe import Recipe, RecipeError

__all__ = [
    "RunPaths",
    "benchmark_stage",
    "eval_stage",
    "export_stage",
    "find_checkpoint",
    "generate_stage",
    "initial_checkpoint",
    "inspect_stage",
    "load_trained",
    "mixture_sources",
    "needle_stage",
    "position_stage",
    "pretrain_stage",
    "run_all",
    "sft_stage",
    "tokenize_stage",
    "tokenizer_report_stage",
    "train_tokenizer_stage",
    "trained_recipe",
]


def run_all(recipe: Recipe) -> dict[str, Any]:
    """tokenizer → shards → pretrain → eval → samples → export, for one recipe."""
    if world_size() > 1:
        raise RecipeError(
            "run/demo are single-process; under torchrun run only the pretrain verb (prepare"
            " the tokenizer and shards first with 'lmforge tokenize' in one process)"
        )
    RunPaths(recipe.run_dir).refuse_if_trained("running the chain again")
    train_tokenizer_stage(recipe)
    manifest = tokenize_stage(recipe)
    records = pretrain_stage(recipe)
    metrics = eval_stage(recipe)
    samples = dict(
        zip(recipe.demo.prompts, generate_stage(recipe, list(recipe.demo.prompts)), strict=True)
    )
    export = export_stage(recipe)
    summary = {
        "run_dir": recipe.run_dir,
        "train_tokens": manifest["splits"]["train"]["tokens"],
        "steps": records[-1]["step"] if records else 0,
        "final_train_loss": records[-1]["loss"] if records else None,
        "tok_per_s": _median([r["tok_per_s"] for r in records[1:]] or [0.0]),
        **metrics,
        "samples": samples,
        "export": str(export),
    }
    (RunPaths(recipe.run_dir).root / "summary.json").write_text(
        json.dumps(summary, indent=2, ensure_ascii=False)
    )
    return summary


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]
