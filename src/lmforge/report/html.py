"""The report page: one HTML section per kind of evidence, assembled by `render_html`.

Plots are inlined as base64 PNGs and there is no script, so the page opens offline and can be
mailed as it is. A section a run lacks the data for shows a note, never an error.
"""

from __future__ import annotations

import base64
import json
import math
import statistics
from collections.abc import Callable
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

from lmforge import __version__
from lmforge.report.plots import (
    Panel,
    plot_loss,
    plot_loss_by_position,
    plot_mixture,
    plot_panels,
)
from lmforge.report.run import (
    STATUS_HEADER,
    RunData,
    is_number,
    mixture_by_stage,
    read_runs,
    run_status,
    stage_segments,
    status_row,
)


class _Html(str):
    """Markup a table cell takes as it is (everything else is escaped)."""


def _cell(x: Any) -> str:
    if isinstance(x, _Html):
        return x
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x) or abs(x) >= 1e7 or 0 < abs(x) < 1e-3:
            return f"{x:.4g}"
        if x.is_integer() and abs(x) >= 10:
            return f"{int(x):,}"
        return f"{x:.4f}" if abs(x) < 10 else f"{x:,.1f}"
    return escape(str(x))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _missing(runs: list[RunData], has: Callable[[RunData], Any], what: str) -> str:
    return "".join(_note(f"{r.name}: {what}") for r in runs if not has(r))


def section_status(runs: list[RunData]) -> str:
    rows = [[*status_row(run_status(r)), str(r.root)] for r in runs]
    notes = "".join(_note(f"{r.name}: {n}") for r in runs for n in r.notes)
    return _table([*STATUS_HEADER, "path"], rows) + notes


def section_loss(runs: list[RunData]) -> str:
    body = _img(plot_loss(runs), "loss vs tokens")
    body += _missing(runs, lambda r: r.metrics, "no metrics.jsonl (training has not started)")
    keys = "step tokens stage kind z loss grad_norm action rewound_to_step".split()
    rows = [[r.name, *(e.get(k) for k in keys)] for r in runs for e in r.events]
    if rows:
        body += "<h3>Loss-spike guard events (events.jsonl)</h3>"
        body += _table(["run", *(k.replace("_", " ") for k in keys)], rows)
    else:
        body += _note("no guard events (events.jsonl absent or empty)")
    return body


def section_optimizer(runs: list[RunData]) -> str:
    panels: list[Panel] = [
        ("lr", "learning rate", "linear", 1.0),
        ("grad_norm", "grad norm (before clipping)", "log", 1.0),
    ]
    return _img(plot_panels(runs, panels), "learning rate and gradient norm") or _note(
        "no run has metrics"
    )


def section_throughput(runs: list[RunData]) -> str:
    panels: list[Panel] = [
        ("tok_per_s", "tokens / s", "linear", 1.0),
        ("mfu", "MFU (%)", "linear", 100.0),
    ]
    rows = []
    for r in runs:
        later = r.metrics[1:]  # the first step includes warm-up (allocation, compilation)
        speeds = [x["tok_per_s"] for x in later if is_number(x.get("tok_per_s"))]
        mfus = [x["mfu"] * 100 for x in later if is_number(x.get("mfu"))]
        if speeds:
            rows.append([r.name, statistics.median(speeds), statistics.median(mfus or [math.nan])])
    body = _img(plot_panels(runs, panels), "throughput and MFU")
    if rows:
        body += _table(["run", "median tokens / s (after step 1)", "median MFU (%)"], rows)
    return body or _note("no run has metrics")


def section_stages(runs: list[RunData]) -> str:
    panels: list[Panel] = [
        ("seq_len", "sequence length", "linear", 1.0),
        ("rope_theta", "rope_theta", "log", 1.0),
    ]
    rows = [
        [
            r.name,
            s.name,
            f"{s.first_step}–{s.last_step}",
            f"{s.start_tokens:,}–{s.end_tokens:,}",
            s.seq_len,
            s.rope_theta,
            s.first_lr,
            s.last_lr,
        ]
        for r in runs
        for s in stage_segments(r.metrics)
    ]
    body = _img(plot_panels(runs, panels, steps=True), "sequence length and RoPE base")
    if rows:
        header = ["run", "stage", "steps", "tokens", "seq_len", "rope_theta", "lr first", "lr last"]
        body += _table(header, rows)
    return body or _note("no run has metrics")


def section_mixture(runs: list[RunData]) -> str:
    by_run = {r.name: mixture_by_stage(r.metrics) for r in runs}
    sources = sorted({s for stages in by_run.values() for c in stages.values() for s in c})
    rows = []
    for name, stages in by_run.items():
        for stage, counts in stages.items():
            total = sum(counts.values()) or 1
            cells = [f"{counts.get(s, 0) / total:.1%} ({counts.get(s, 0):,})" for s in sources]
            rows.append([name, stage, *cells])
    body = _img(plot_mixture(runs), "realised data mixture")
    if rows:
        body += _table(["run", "stage", *sources], rows)
        body += _note(
            "tokens placed in rows per source, from metrics.jsonl's tokens_by_source (logged"
            " every train.log_every_steps; an interval counts for the stage that ends it)"
        )
    return body + _missing(runs, lambda r: by_run[r.name], "no tokens_by_source in metrics.jsonl")


def section_eval(runs: list[RunData]) -> str:
    rows = []
    for r in runs:
        ev = r.files.get("eval")
        if ev is None:
            continue
        ckpt = Path(str(ev.get("checkpoint", ""))).name or None
        keys = ("loss", "ppl", "bpb", "tokens")
        rows.append([r.name, ckpt, "all", *(ev.get(f"val_{k}") for k in keys)])
        for split, m in ev.items():
            if isinstance(m, dict):
                rows.append([r.name, None, split, *(m.get(k) for k in keys)])
    body = "<h3>Held-out loss (eval.json)</h3>"
    if rows:
        body += _table(["run", "checkpoint", "split", "loss", "ppl", "bits/byte", "tokens"], rows)
    body += _missing(runs, lambda r: "eval" in r.files, "no eval.json (`lmforge eval`)")
    body += "<h3>Benchmarks (benchmarks.json)</h3>" + _benchmark_table(runs)
    return body + _missing(
        runs, lambda r: "benchmarks" in r.files, "no benchmarks.json (`lmforge eval --tasks`)"
    )


def _benchmark_table(runs: list[RunData]) -> str:
    results = [(r.name, r.files["benchmarks"]) for r in runs if "benchmarks" in r.files]
    if not results:
        return ""
    tasks = list(dict.fromkeys(t for _, b in results for t in b.get("tasks", {})))
    groups = list(dict.fromkeys(g for _, b in results for g in b.get("averages", {})))
    rows = []
    for task in tasks:
        found = [b["tasks"][task] for _, b in results if task in b.get("tasks", {})]
        row = [task, found[0].get("n"), found[0].get("num_fewshot")]
        for _, b in results:
            row += _score_cells(b.get("tasks", {}).get(task))
        rows.append(row)
    for group in groups:
        row = [_Html(f"<b>{escape(group)} average</b>"), None, None]
        for _, b in results:
            a = b.get("averages", {}).get(group)
            row += [a.get("acc"), a.get("acc_norm")] if a else [None, None]
        rows.append(row)
    header = ["task", "n", "shots"]
    for name, _ in results:
        header += [f"{name} acc", f"{name} acc_norm"]
    return _table(header, rows)


def _score_cells(result: dict[str, Any] | None) -> list[Any]:
    if result is None:
        return [None, None]
    passes = [f"{k} {v:.4f}" for k, v in result.items() if k.startswith("pass@")]
    if passes:
        return [", ".join(passes), None]

    def pm(metric: str) -> str | None:
        value, stderr = result.get(metric), result.get(f"{metric}_stderr")
        if not is_number(value):
            return None
        return f"{value:.4f} ± {stderr:.4f}" if is_number(stderr) else f"{value:.4f}"

    return [pm("acc"), pm("acc_norm")]


def section_position(runs: list[RunData]) -> str:
    return _img(plot_loss_by_position(runs), "loss by position") + _missing(
        runs,
        lambda r: "loss_by_position" in r.files,
        "no loss_by_position.json (`lmforge eval --by-position L`)",
    )


def section_needle(runs: list[RunData]) -> str:
    body = ""
    for r in runs:
        variants = sorted(
            {*r.needles, *(k.removeprefix("needle_") for k in r.pngs if k.startswith("needle_"))}
        )
        for variant in variants:
            data = r.needles.get(variant, {})
            body += f"<h3>{escape(r.name)}: {escape(variant)}</h3>"
            body += _note(_needle_caption(data)) if data else ""
            png = r.pngs.get(f"needle_{variant}")
            if png is not None:
                body += _img(png, f"{r.name} {variant} heatmap")
            elif isinstance(data.get("exact"), list):
                header = ["depth \\ length", *(str(n) for n in data.get("lengths", []))]
                grid = zip(data.get("depths", []), data["exact"], strict=False)
                body += _table(header, [[f"{d:g}%", *row] for d, row in grid])
    return body + _missing(
        runs,
        lambda r: r.needles or any(k.startswith("needle_") for k in r.pngs),
        "no needle_*.json / .png (`lmforge eval --needle`)",
    )


def _needle_caption(data: dict[str, Any]) -> str:
    parts = []
    if is_number(data.get("accuracy")):
        parts.append(f"exact match {data['accuracy']:.1%}")
    if is_number(data.get("rope_theta")):
        parts.append(f"rope_theta {data['rope_theta']:g}")
    if data.get("train_seq_len"):
        parts.append(f"trained at {data['train_seq_len']} tokens")
    if data.get("checkpoint"):
        parts.append(f"checkpoint {Path(str(data['checkpoint'])).name}")
    return ", ".join(parts)


def section_tokenizer(runs: list[RunData]) -> str:
    body = ""
    keys = ["tokenizer", "source", "language", "bytes_per_token", "chars_per_token"]
    keys += ["tokens_per_1k_han", "tokens_per_1k_words"]
    for r in runs:
        report = r.files.get("tokenizer_report", {})
        png = r.pngs.get("tokenizer_report")
        if not report and png is None:
            continue
        body += f"<h3>{escape(r.name)}</h3>" + _img(png, f"{r.name} tokenizer compression")
        rows = [[row.get(k) for k in keys] for row in report.get("rows", [])]
        if rows:
            body += _table([k.replace("_", " ") for k in keys], rows)
    return body + _missing(
        runs,
        lambda r: "tokenizer_report" in r.files or "tokenizer_report" in r.pngs,
        "no tokenizer_report/ (`lmforge tokenizer-report`)",
    )


def section_sft(runs: list[RunData]) -> str:
    found = [(r.name, r.files["sft_data"]) for r in runs if "sft_data" in r.files]
    keys = list(dict.fromkeys(k for _, d in found for k in d))
    body = _table(["", *(n for n, _ in found)], [[k, *(d.get(k) for _, d in found)] for k in keys])
    return (body if found else "") + _missing(
        runs, lambda r: "sft_data" in r.files, "no sft_data.json (not an SFT run)"
    )


def section_recipe(runs: list[RunData]) -> str:
    body = ""
    recipes = [(r.name, _flatten(r.recipe)) for r in runs if r.recipe is not None]
    if len(recipes) > 1:
        keys = list(dict.fromkeys(k for _, flat in recipes for k in flat))
        rows = [
            [k, *(_plain(flat.get(k)) for _, flat in recipes)]
            for k in keys
            if len({json.dumps(flat.get(k), sort_keys=True, default=str) for _, flat in recipes})
            > 1
        ]
        body += "<h3>Differences</h3>" + _table(["key", *(n for n, _ in recipes)], rows)
    for r in runs:
        if r.recipe_text is not None:
            body += f"<details{' open' if len(runs) == 1 else ''}><summary>{escape(r.name)}:"
            body += f" recipe.yaml</summary><pre>{escape(r.recipe_text)}</pre></details>"
    return body + _missing(runs, lambda r: r.recipe_text is not None, "no recipe.yaml")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _plain(v: Any) -> Any:
    return json.dumps(v, ensure_ascii=False, default=str) if isinstance(v, list | dict) else v


SECTIONS: list[tuple[str, str, Callable[[list[RunData]], str]]] = [
    ("runs", "Runs", section_status),
    ("loss", "Loss", section_loss),
    ("optimizer", "Learning rate and gradient norm", section_optimizer),
    ("throughput", "Throughput and MFU", section_throughput),
    ("stages", "Stages: sequence length and RoPE base", section_stages),
    ("mixture", "Realised data mixture", section_mixture),
    ("eval", "Evaluation", section_eval),
    ("position", "Loss by position", section_position),
    ("needle", "Needle in a haystack", section_needle),
    ("tokenizer", "Tokenizer compression", section_tokenizer),
    ("sft", "Instruction-tuning data", section_sft),
    ("recipe", "Recipe", section_recipe),
]

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; max-width: 1180px;
       margin: 0 auto; padding: 0 24px 48px; }
nav a { margin-right: 14px; }
h2 { border-bottom: 1px solid #ddd; padding-top: 12px; }
img { display: block; max-width: 100%; height: auto; margin: 8px 0; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
.note { color: #7a5200; margin: 4px 0; }
pre { background: #f7f7f7; padding: 8px; overflow: auto; font-size: 12px; }
"""


def render_html(runs: list[RunData]) -> str:
    """The whole page; a section whose data has an unexpected shape becomes a note."""
    parts = []
    for anchor, title, build in SECTIONS:
        try:
            body = build(runs)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            body = _note(f"this section could not be drawn: {type(e).__name__}: {e}")
        parts.append(f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>')
    names = ", ".join(r.name for r in runs)
    nav = "".join(f'<a href="#{a}">{escape(t.split(":")[0])}</a>' for a, t, _ in SECTIONS)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>lmforge report: {escape(names)}</title>'
        f"<style>{CSS}</style></head><body>"
        f"<h1>lmforge report: {escape(names)}</h1>"
        f'<p class="meta">lmforge {escape(__version__)}, generated {when}</p>'
        f"<nav>{nav}</nav>{''.join(parts)}</body></html>\n"
    )


def default_out(run_dirs: list[Path]) -> Path:
    """RUN/report for one run; beside the first run, report_A_vs_B, for several."""
    if len(run_dirs) == 1:
        return run_dirs[0] / "report"
    return run_dirs[0].parent / ("report_" + "_vs_".join(p.name for p in run_dirs))


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Read the runs, write OUT/report.html (one file: images inlined), return its path."""
    runs = read_runs(run_dirs)
    target = Path(out) if out is not None else default_out([Path(p) for p in run_dirs])
    target.mkdir(parents=True, exist_ok=True)
    page = target / "report.html"
    page.write_text(render_html(runs), encoding="utf-8")
    return page
