"""Ablations: paired variants of one recipe, several seeds each, equal token budgets, same data.

A spec (YAML) names a base recipe with overrides, the variants (more overrides each) and the
seeds. Every variant is trained with every seed, so variant A and B at seed s differ only in what
the spec changes: the differences are paired, and their mean ± standard deviation over seeds is
what the report leads with. Tokenizer and shards are prepared once per distinct data and
tokenizer config (mixture weights do not count: they act when training reads), and every run
ends with its held-out metrics (overall and per source) and, when the spec names tasks, the
benchmark scores. A finished run is never redone, so an interrupted ablation picks up where it
stopped.

    name: masking
    recipe: recipes/demo.yaml
    overrides: [train.max_tokens=300000]
    seeds: [1, 2, 3]
    variants:
      eos_reset: [packing.document_masking=true]
      plain_causal: [packing.document_masking=false]
    metrics: [val_loss, english.loss, chinese.loss]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge import pipeline
from lmforge.logs import read_metrics
from lmforge.recipe import Recipe, RecipeError, build, load_recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AblationSpec:
    name: str
    variants: dict[str, tuple[str, ...]]
    """Variant name → its overrides; the first variant is the reference of the differences."""
    recipe: str | None = None
    """Base recipe file (relative to the spec's folder); None: the demo defaults."""
    overrides: tuple[str, ...] = ()
    """Applied to every run, before the variant's."""
    seeds: tuple[int, ...] = (1, 2, 3)
    metrics: tuple[str, ...] = ("val_loss", "val_bpb")
    """Keys of eval.json (`val_loss`, `english.loss`, ...) or of benchmarks (`arc_easy.acc`)."""
    tasks: tuple[str, ...] = ()
    """Benchmarks scored on every final checkpoint (see `lmforge eval --tasks`)."""
    data_dir: str | None = None
    """Where the tasks' data lives (None: Hugging Face datasets)."""
    limit: int | None = None
    """First N questions of each task."""

    def __post_init__(self) -> None:
        if len(self.variants) < 2 or not self.seeds:
            raise ValueError("an ablation needs at least two variants and one seed")


@dataclass
class RunResult:
    variant: str
    seed: int
    run_dir: str
    metrics: dict[str, float]
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(tokens, held-out loss) at each evaluation."""
    recipe_sha: str = ""
    """What the spec asked to train (base recipe text and overrides; the seed is the folder's):
    a run whose spec changed since is not reused; a new lmforge version with new defaults is."""
    scoring: dict[str, Any] = field(default_factory=dict)
    """How the tasks were scored (tasks, data_dir, limit): changed, they are scored again."""


def load_spec(path: str | Path) -> AblationSpec:
    where = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{where}: no such ablation spec") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: invalid YAML: {e}") from None
    spec = build(AblationSpec, raw, where, "")
    if spec.recipe is not None and not Path(spec.recipe).is_absolute():
        spec = dataclasses.replace(spec, recipe=str(Path(path).parent / spec.recipe))
    return spec


def run_recipe(spec: AblationSpec, variant: str, seed: int, run_dir: Path) -> Recipe:
    overrides = [*spec.overrides, *spec.variants[variant], f"seed={seed}", f"run_dir={run_dir}"]
    return load_recipe(spec.recipe, overrides)


def data_key(recipe: Recipe) -> str:
    """What tokenizer and shards depend on: the data and tokenizer configs, weights aside."""
    data = dataclasses.replace(
        recipe.data,
        sources=tuple(
            dataclasses.replace(s, weight=None, max_epochs=None) for s in recipe.data.sources
        ),
        mixture_stages=(),
    )
    text = json.dumps(
        [dataclasses.asdict(data), dataclasses.asdict(recipe.tokenizer)], sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def prepare_data(recipe: Recipe, root: Path) -> Path:
    """Tokenizer and shards for this data config, made once under root/data-KEY."""
    prep = root / f"data-{data_key(recipe)}"
    if not (prep / "shards" / "manifest.json").is_file():
        at = dataclasses.replace(recipe, run_dir=str(prep))
        pipeline.train_tokenizer_stage(at)
        pipeline.tokenize_stage(at)
    return prep


def run_one(spec: AblationSpec, variant: str, seed: int, root: Path) -> RunResult:
    """Train one variant × seed and measure it. A finished run is not trained again; metrics
    it lacks (a task added to the spec later) are measured on its final checkpoint."""
    run_dir = root / variant / f"seed{seed}"
    done = run_dir / "ablation_result.json"
    previous = RunResult(**json.loads(done.read_text())) if done.is_file() else None
    recipe = run_recipe(spec, variant, seed, run_dir)
    base = Path(spec.recipe).read_text(encoding="utf-8") if spec.recipe else None
    recipe_sha = _sha({"base": base, "overrides": [*spec.overrides, *spec.variants[variant]]})
    scoring = {"tasks": list(spec.tasks), "data_dir": spec.data_dir, "limit": spec.limit}
    if previous is not None and previous.recipe_sha not in ("", recipe_sha):
        raise RecipeError(
            f"{run_dir}: trained with another recipe than the spec now gives for {variant!r}"
            " (its overrides or base recipe changed); remove that folder to train it again, or"
            " use another --out"
        )
    if previous is not None and all(m in previous.metrics for m in spec.metrics):
        if not spec.tasks or previous.scoring == scoring:
            return previous
    if previous is None:
        train(recipe, root)
    flat = flatten(pipeline.eval_stage(recipe))
    if spec.tasks:
        scores = pipeline.benchmark_stage(recipe, list(spec.tasks), spec.data_dir, limit=spec.limit)
        flat |= flatten(scores["tasks"])
    missing = [m for m in spec.metrics if m not in flat]
    if missing:
        raise RecipeError(f"{spec.name}: metrics {missing} not measured; have {sorted(flat)}")
    curve = [
        (r["tokens"], r["val_loss"])
        for r in read_metrics(run_dir / "metrics.jsonl")
        if "val_loss" in r
    ]
    measured = {m: flat[m] for m in spec.metrics}
    result = RunResult(variant, seed, str(run_dir), measured, curve, recipe_sha, scoring)
    tmp = done.with_name(done.name + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(result)))
    tmp.replace(done)
    return result


def _sha(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def train(recipe: Recipe, root: Path) -> None:
    """Pretrain one run on the shared tokenizer and shards (linked into its run dir)."""
    run_dir = Path(recipe.run_dir)
    prep = prepare_data(recipe, root)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "shards"):
        if not (run_dir / name).exists():
            os.symlink((prep / name).resolve(), run_dir / name)
    if (run_dir / "checkpoints").exists():  # an interrupted run: go on from its checkpoint
        pipeline.pretrain_stage(recipe, resume=True)
    else:
        pipeline.pretrain_stage(recipe)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"english": {"loss": 2.1}} → {"english.loss": 2.1}; numbers only."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, f"{key}.")
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def summarize(spec: AblationSpec, results: list[RunResult]) -> dict[str, Any]:
    """Per variant and metric: mean, std, min, max over seeds; and the paired difference from
    the first variant (same seed), mean ± std."""
    names = list(spec.variants)
    ref = names[0]
    by = {(r.variant, r.seed): r for r in results}
    table: dict[str, Any] = {}
    for variant in names:
        table[variant] = {}
        for metric in spec.metrics:
            values = [by[variant, s].metrics[metric] for s in spec.seeds]
            row = _stats(values)
            if variant != ref:
                diffs = [
                    by[variant, s].metrics[metric] - by[ref, s].metrics[metric] for s in spec.seeds
                ]
                row["diff_vs_" + ref] = _stats(diffs)
            table[variant][metric] = row
    return {"name": spec.name, "seeds": list(spec.seeds), "reference": ref, "variants": table}


def _stats(values: list[float]) -> dict[str, Any]:
    """mean, std, min, max, n; a diverged run's NaN makes them NaN (inf: std NaN), not a crash
    or an order-dependent min/max."""
    std = 0.0
    if len(values) > 1:
        std = statistics.stdev(values) if all(map(math.isfinite, values)) else math.nan
    nan = any(map(math.isnan, values))
    return {
        "mean": statistics.fmean(values),
        "std": std,
        "min": math.nan if nan else min(values),
        "max": math.nan if nan else max(values),
        "n": float(len(values)),
    }


def markdown(summary: dict[str, Any], spec: AblationSpec) -> str:
    ref = summary["reference"]
    lines = [
        f"## {spec.name}: {len(spec.seeds)} seeds ({', '.join(map(str, spec.seeds))}), "
        f"mean ± std; differences paired by seed against `{ref}`",
        "",
        "| variant | " + " | ".join(spec.metrics) + " |",
        "|---|" + "---:|" * len(spec.metrics),
    ]
    for variant, metrics in summary["variants"].items():
        cells = []
        for m in spec.metrics:
            row = metrics[m]
            cell = f"{row['mean']:.4f} ± {row['std']:.4f}"
            diff = row.get(f"diff_vs_{ref}")
            if diff is not None:
                cell += f" (Δ {diff['mean']:+.4f} ± {diff['std']:.4f})"
            cells.append(cell)
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], results: list[RunResult], spec: AblationSpec, out: Path) -> None:
    """Held-out loss vs tokens (mean over seeds, band = min..max) and each metric as bars with
    the seed spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + len(spec.metrics)
    cols = min(panels, 4)
    rows = -(-panels // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.6 * rows), squeeze=False)
    axes = grid.ravel()
    for unused in axes[panels:]:
        unused.set_axis_off()
    curves = axes[0]
    for variant in spec.variants:
        runs = [r for r in results if r.variant == variant and r.curve]
        if not runs:
            continue
        n = min(len(r.curve) for r in runs)
        tokens = [runs[0].curve[i][0] for i in range(n)]
        values = [[r.curve[i][1] for r in runs] for i in range(n)]
        curves.plot(tokens, [statistics.fmean(v) for v in values], label=variant)
        curves.fill_between(tokens, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
    curves.set(xlabel="tokens", ylabel="held-out loss", title="held-out loss (band: seeds)")
    if curves.get_legend_handles_labels()[0]:
        curves.legend()
    for ax, metric in zip(axes[1:panels], spec.metrics, strict=True):
        stats = [summary["variants"][v][metric] for v in spec.variants]
        ok = [math.isfinite(st["mean"]) for st in stats]  # a diverged seed: no bar, a note
        names = [
            v if good else f"{v}\n(not finite)" for v, good in zip(spec.variants, ok, strict=True)
        ]
        means = [st["mean"] if good else 0.0 for st, good in zip(stats, ok, strict=True)]
        stds = [st["std"] if math.isfinite(st["std"]) else 0.0 for st in stats]
        ax.bar(names, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.7)
        for i, v in enumerate(spec.variants):
            seeds = [x for r in results if r.variant == v and math.isfinite(x := r.metrics[metric])]
            ax.scatter([i] * len(seeds), seeds, color="black", s=10, zorder=3)
        finite = [x for r in results if math.isfinite(x := r.metrics[metric])]
        if finite:
            low, high = min(finite), max(finite)
            pad = (high - low) * 0.5 or abs(high) * 0.01 or 0.01
            ax.set_ylim(low - pad, high + pad)
        ax.set(title=metric)
    fig.suptitle(spec.name)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run_ablation(spec: AblationSpec, root: str | Path) -> dict[str, Any]:
    """Every variant × seed (seed-major, so an interrupted run has paired results), then the
    summary in root/ablation.json, .md and .png."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in spec.seeds:
        for variant in spec.variants:
            log.info("ablation %s: %s, seed %d", spec.name, variant, seed)
            results.append(run_one(spec, variant, seed, root))
    summary = summarize(spec, results)
    summary["runs"] = [dataclasses.asdict(r) for r in results]
    (root / "ablation.json").write_text(json.dumps(summary, indent=2))
    (root / "ablation.md").write_text(markdown(summary, spec) + "\n")
    plot(summary, results, spec, root / "ablation.png")
    return summary
