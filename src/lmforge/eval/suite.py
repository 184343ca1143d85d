"""The benchmark suite behind `lmforge eval --tasks`: multiple-choice tasks scored by
log-likelihood in lm-eval's formats, HumanEval pass@1 in a sandbox, and the reports' averages."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.data.tokenizer import TextTokenizer
from lmforge.eval.humaneval import STOP_SEQUENCES, evaluate_humaneval, load_problems
from lmforge.eval.multiple_choice import LoglikelihoodScorer, mc_metrics
from lmforge.eval.tasks import load_task, task_spec
from lmforge.generate import GenerateConfig, generate_texts
from lmforge.model.llama import Llama

COMMONSENSE: tuple[str, ...] = ("arc_easy", "arc_challenge", "boolq", "copa", "hellaswag")
COMMONSENSE += ("openbookqa", "piqa", "sciq", "winogrande")
KNOWLEDGE = ("mmlu", "cmmlu", "ceval")
"""The reports' groups: their tables average accuracy over the tasks of a group."""
HUMANEVAL_BATCH = 8
"""Problems decoded as one batch in greedy HumanEval (benchmarks/RESULTS.md)."""


@dataclass(frozen=True, kw_only=True)
class SuiteConfig:
    tasks: tuple[str, ...]
    """Task names (lm-eval's, e.g. arc_easy, mmlu, mmlu_anatomy, ceval-valid) or humaneval."""
    data_dir: str | None = None
    """A folder with one subfolder of data files per task; None loads lm-eval's HF datasets."""
    num_fewshot: int | None = None
    """Shots for every task; None uses each task's default (5 for MMLU/CMMLU/C-Eval)."""
    limit: int | None = None
    """First N questions (problems) of each task, or of each subject of a group."""
    max_length: int = 2048
    """Model context: longer prompts are cut from the left, as lm-eval does."""
    bf16: bool = False
    """Score under bf16 autocast."""
    samples: int = 1
    """HumanEval completions per problem: 1 is greedy pass@1; more are sampled at `temperature`
    and give pass@1, pass@10, pass@100 (those <= samples), unbiased (Chen et al. 2021)."""
    temperature: float = 0.8
    """HumanEval sampling temperature when samples > 1 (the Codex paper's choice for pass@100)."""


def check_task_names(tasks: Sequence[str]) -> None:
    """Fail before loading a model when a task name is unknown."""
    for name in tasks:
        if name == "humaneval":
            continue
        try:
            task_spec(name)
        except KeyError as e:
            raise ValueError(f"{e.args[0]}, humaneval") from None


def run_suite(
    model: Llama, tokenizer: TextTokenizer, device: torch.device, cfg: SuiteConfig
) -> dict[str, Any]:
    """Per-task metrics (acc/acc_norm/acc_bytes ± stderr, or pass@1) and group averages."""
    amp = torch.bfloat16 if cfg.bf16 else None
    scorer = LoglikelihoodScorer(
        model,
        tokenizer.encode,
        tokenizer.bos_id,
        cfg.max_length,
        device,
        amp,
        encode_batch=tokenizer.encode_batch,
    )
    results: dict[str, Any] = {}
    for name in cfg.tasks:
        if name == "humaneval":
            results[name] = _humaneval(model, tokenizer, cfg)
            continue
        task_path = None
        if cfg.data_dir is not None:  # subtasks (mmlu_anatomy) live in their group's folder
            task_path = Path(cfg.data_dir) / name
            if not task_path.exists():
                task_path = Path(cfg.data_dir) / task_spec(name).kind
        task = load_task(name, task_path, num_fewshot=cfg.num_fewshot, limit=cfg.limit)
        try:
            scores = scorer.score(task.requests, desc=name)
        except ValueError as e:  # e.g. an answer longer than the model's context
            raise ValueError(f"{name}: {e}") from None
        results[name] = {
            **mc_metrics(task.requests, scores),
            "num_fewshot": task.num_fewshot,
            "n": len(task.requests),
            "data": sorted({re.sub(r"(:\d+|\[\d+\])$", "", r.where) for r in task.requests}),
        }
    return {"tasks": results, "averages": _averages(results)}


def _humaneval(model: Llama, tokenizer: TextTokenizer, cfg: SuiteConfig) -> dict[str, Any]:
    """pass@k from completions run against each problem's tests in a sandbox."""
    files = sorted((Path(cfg.data_dir) / "humaneval").glob("*.jsonl*")) if cfg.data_dir else []
    problems = load_problems(files[0] if files else None)
    problems = problems[: cfg.limit] if cfg.limit is not None else problems
    greedy = cfg.samples == 1
    gen = GenerateConfig(max_new_tokens=128, temperature=0.0 if greedy else cfg.temperature)

    def complete(prompts: list[str], n: int) -> list[list[str]]:
        """One batch: greedy, one completion of each prompt (n copies); else n samples of one."""
        if greedy:
            texts = generate_texts(model, tokenizer, prompts, 1, gen, STOP_SEQUENCES)
            return [[text] * n for text in texts]
        return [generate_texts(model, tokenizer, p, n, gen, STOP_SEQUENCES) for p in prompts]

    ks = tuple(k for k in (1, 10, 100) if k <= cfg.samples)
    result = evaluate_humaneval(
        complete, problems, n_samples=cfg.samples, ks=ks, batch=HUMANEVAL_BATCH if greedy else 1
    )
    return {f"pass@{k}": result[f"pass@{k}"] for k in ks} | {
        "n": result["num_problems"],
        "samples": cfg.samples,
        "num_fewshot": 0,
    }


def _averages(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    averages = {}
    for group, names in (("commonsense", COMMONSENSE), ("knowledge", KNOWLEDGE)):
        present = [results[n] for n in names if n in results]
        if present:
            averages[group] = {
                metric: sum(r[metric] for r in present) / len(present)
                for metric in ("acc", "acc_norm")
            } | {"tasks": len(present)}
    return averages


def benchmark_table(out: dict[str, Any]) -> str:
    """Markdown: one row per task (acc ± stderr, acc_norm ± stderr), then the group averages."""
    lines = ["| task | n | shots | acc | acc_norm | acc_bytes |", "|---|---|---|---|---|---|"]
    for name, r in out["tasks"].items():
        if "pass@1" in r:
            passes = ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k.startswith("pass@"))
            lines.append(f"| {name} | {r['n']} | 0 | {passes} | | |")
            continue
        cells = [f"{r[m]:.4f} ± {r[m + '_stderr']:.4f}" for m in ("acc", "acc_norm", "acc_bytes")]
        lines.append(f"| {name} | {r['n']} | {r['num_fewshot']} | " + " | ".join(cells) + " |")
    for group, a in out["averages"].items():
        lines.append(
            f"| **{group} average** ({a['tasks']} tasks) | | | {a['acc']:.4f} |"
            f" {a['acc_norm']:.4f} | |"
        )
    return "\n".join(lines)
