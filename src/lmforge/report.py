"""The run report: one static HTML page showing what a run (or several, overlaid) did.

`read_run` gathers a run dir's files into a RunData: metrics.jsonl, events.jsonl, recipe.yaml,
checkpoints/, and the eval outputs that exist (eval.json, benchmarks.json, needle_*.json/.png,
loss_by_position.json, tokenizer_report/, sft_data.json). `render_html` draws RunData values
into one self-contained page: the plots are matplotlib PNGs inlined as base64, there is no
script and nothing is fetched, so the file opens offline and can be mailed as it is. A piece a
run lacks becomes a note on the page, never an error; a folder that is not a run at all is a
RunDirError. `run_status` is the state `lmforge runs` prints for each run it finds.
"""

from __future__ import annotations

import base64
import io
import json
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

import yaml

from lmforge import __version__
from lmforge.checkpoint import completed_checkpoints
from lmforge.recipe import load_recipe
from lmforge.train.stages import total_steps

JSON_FILES = {
    "eval": "eval.json",
    "benchmarks": "benchmarks.json",
    "loss_by_position": "loss_by_position.json",
    "sft_data": "sft_data.json",
    "tokenizer_report": "tokenizer_report/tokenizer_report.json",
}
"""The optional outputs of the eval verbs, by the name the page uses for them."""


class RunDirError(ValueError):
    """A path that is not a run dir (nothing any stage writes is in it)."""


@dataclass
class RunData:
    name: str
    root: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    recipe_text: str | None = None
    recipe: dict[str, Any] | None = None
    planned_steps: int | None = None
    """Total steps of the recipe's resolved stages (None: no loadable recipe.yaml)."""
    checkpoints: list[tuple[str, int]] = field(default_factory=list)
    """Completed checkpoints as (folder name, step), oldest first."""
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The parsed JSON_FILES that exist, by their JSON_FILES name."""
    needles: dict[str, dict[str, Any]] = field(default_factory=dict)
    """needle_{variant}.json by variant."""
    pngs: dict[str, bytes] = field(default_factory=dict)
    """needle_{variant}.png and tokenizer_report.png, by file stem."""
    notes: list[str] = field(default_factory=list)
    """Files that exist but could not be read, one line each."""


# ---------------------------------------------------------------------------- reading a run


def is_run(path: Path) -> bool:
    """A run dir is one where training started: metrics, the saved recipe or checkpoints."""
    return (
        (path / "metrics.jsonl").is_file()
        or (path / "recipe.yaml").is_file()
        or (path / "checkpoints").is_dir()
    )


def read_run(path: str | Path, name: str | None = None) -> RunData:
    root = Path(path)
    if not root.is_dir():
        raise RunDirError(f"{root}: no such directory")
    if not is_run(root):
        raise RunDirError(
            f"{root}: not a run dir (no metrics.jsonl, recipe.yaml or checkpoints/ in it)"
        )
    run = RunData(name=name or root.name, root=root)
    run.metrics = _read_jsonl(root / "metrics.jsonl", run.notes)
    run.events = _read_jsonl(root / "events.jsonl", run.notes)
    _read_recipe(run)
    for ckpt in completed_checkpoints(root / "checkpoints"):
        run.checkpoints.append((ckpt.name, _checkpoint_step(ckpt)))
    for key, rel in JSON_FILES.items():
        data = _read_json(root / rel, run.notes)
        if data is not None:
            run.files[key] = data
    for needle in sorted(root.glob("needle_*.json")):
        data = _read_json(needle, run.notes)
        if data is not None:
            run.needles[needle.stem.removeprefix("needle_")] = data
    for png in [*sorted(root.glob("needle_*.png")), root / "tokenizer_report/tokenizer_report.png"]:
        if png.is_file():
            run.pngs[png.stem] = png.read_bytes()
    return run


def read_runs(paths: Iterable[str | Path]) -> list[RunData]:
    """Several runs, named by their folder (by parent/folder where two folders share a name)."""
    roots = [Path(p) for p in paths]
    names = [r.name for r in roots]
    return [
        read_run(r, f"{r.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name)
        for r in roots
    ]


def _read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: {bad} unreadable line(s) skipped")
    return records


def _read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        notes.append(f"{path.name}: unreadable ({e})")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path.name}: not a JSON object")
        return None
    return data


def _read_recipe(run: RunData) -> None:
    path = run.root / "recipe.yaml"
    if not path.is_file():
        return
    run.recipe_text = path.read_text(encoding="utf-8", errors="replace")
    try:
        loaded = yaml.safe_load(run.recipe_text)
        run.recipe = loaded if isinstance(loaded, dict) else None
        run.planned_steps = total_steps(load_recipe(path).resolved_stages())
    except (yaml.YAMLError, ValueError) as e:  # RecipeError is a ValueError
        run.notes.append(f"recipe.yaml: planned steps unknown ({e})")


def _checkpoint_step(ckpt: Path) -> int:
    try:
        return int(json.loads((ckpt / "trainer.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        digits = ckpt.name.removeprefix("step_")
        return int(digits) if digits.isdigit() else 0


# ---------------------------------------------------------------------------- derived values


@dataclass(frozen=True)
class Segment:
    """A run of consecutive metrics records of one stage."""

    name: str
    first_step: int
    last_step: int
    start_tokens: int
    end_tokens: int
    seq_len: Any
    rope_theta: Any
    first_lr: Any
    last_lr: Any


def stage_segments(records: list[dict[str, Any]]) -> list[Segment]:
    """Stages in the order trained; a new segment starts wherever `stage` changes."""
    groups: list[list[dict[str, Any]]] = []
    for r in records:
        if groups and groups[-1][-1].get("stage") == r.get("stage"):
            groups[-1].append(r)
        else:
            groups.append([r])
    segments, start = [], 0
    for g in groups:
        first, last = g[0], g[-1]
        segments.append(
            Segment(
                str(first.get("stage", "-")),
                first.get("step", 0),
                last.get("step", 0),
                start,
                last.get("tokens", start),
                first.get("seq_len"),
                first.get("rope_theta"),
                first.get("lr"),
                last.get("lr"),
            )
        )
        start = last.get("tokens", start)
    return segments


def mixture_intervals(records: list[dict[str, Any]]) -> tuple[list[int], dict[str, list[float]]]:
    """Each source's share of the tokens placed in rows between two records that carry
    tokens_by_source (every train.log_every_steps), at the token count ending the interval."""
    logged = [r for r in records if isinstance(r.get("tokens_by_source"), dict)]
    sources = sorted({s for r in logged for s in r["tokens_by_source"]})
    xs: list[int] = []
    shares: dict[str, list[float]] = {s: [] for s in sources}
    before: dict[str, int] = {}
    for r in logged:
        counts = r["tokens_by_source"]
        delta = {s: counts.get(s, 0) - before.get(s, 0) for s in sources}
        before = counts
        total = sum(delta.values())
        if total > 0:
            xs.append(r.get("tokens", 0))
            for s in sources:
                shares[s].append(delta[s] / total)
    return xs, shares


def mixture_by_stage(records: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Tokens placed per source in each stage (an interval counts for the stage of the record
    that ends it), and "all" for the whole run."""
    out: dict[str, dict[str, int]] = {}
    before: dict[str, int] = {}
    for r in records:
        counts = r.get("tokens_by_source")
        if not isinstance(counts, dict):
            continue
        stage = out.setdefault(str(r.get("stage", "-")), {})
        for s, n in counts.items():
            stage[s] = stage.get(s, 0) + n - before.get(s, 0)
        before = counts
    if before:
        out["all"] = dict(before)
    return out


def run_status(run: RunData) -> dict[str, Any]:
    """Where a run stands: steps done of planned, last losses, latest checkpoint, events. A run
    is finished when its checkpoint at the planned last step exists."""
    last = run.metrics[-1] if run.metrics else {}
    ckpt_name, ckpt_step = run.checkpoints[-1] if run.checkpoints else (None, 0)
    vals = [r["val_loss"] for r in run.metrics if "val_loss" in r]
    return {
        "run": run.name,
        "path": str(run.root),
        "steps": max(last.get("step", 0), ckpt_step),
        "planned": run.planned_steps,
        "tokens": last.get("tokens"),
        "stage": last.get("stage"),
        "checkpoint": ckpt_name,
        "loss": last.get("loss"),
        "val_loss": vals[-1] if vals else None,
        "finished": run.planned_steps is not None and ckpt_step >= run.planned_steps,
        "events": len(run.events),
    }


STATUS_HEADER = ["run", "steps", "tokens", "stage", "latest checkpoint", "loss", "val loss"]
STATUS_HEADER += ["finished", "guard events"]


def status_row(status: dict[str, Any]) -> list[Any]:
    """A run_status as a table row under STATUS_HEADER (steps as done/planned)."""
    planned = "?" if status["planned"] is None else f"{status['planned']:,}"
    keys = ("tokens", "stage", "checkpoint", "loss", "val_loss")
    done = "yes" if status["finished"] else "no"
    return [
        status["run"],
        f"{status['steps']:,}/{planned}",
        *(status[k] for k in keys),
        done,
        status["events"],
    ]


def find_runs(root: str | Path, depth: int = 3) -> list[Path]:
    """Run dirs at or below `root` (down to `depth` folders; nothing inside a run is searched)."""
    root = Path(root)
    if not root.is_dir():
        raise RunDirError(f"{root}: no such directory")
    if is_run(root):
        return [root]
    found: list[Path] = []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if is_run(child):
            found.append(child)
        elif depth > 1:
            found += find_runs(child, depth - 1)
    return found


# ---------------------------------------------------------------------------- plots


def _figure(panels: int, height: float = 3.6) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(11, height * panels), layout="constrained")


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _series(records: list[dict[str, Any]], key: str, scale: float = 1.0) -> tuple[list, list]:
    pairs = [(r["tokens"], r[key] * scale) for r in records if _number(r.get(key))]
    pairs = [(x, y) for x, y in pairs if _number(x)]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _tokens_axis(ax: Any) -> None:
    from matplotlib.ticker import EngFormatter

    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_xlabel("tokens")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def plot_loss(runs: list[RunData]) -> bytes | None:
    """Train and held-out loss vs tokens, stage boundaries dotted, guard events as crosses
    (a non-finite or off-scale event loss sits at the top edge)."""
    if not any(_series(r.metrics, "loss")[0] for r in runs):
        return None
    fig = _figure(1, 4.5)
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        ax.plot(*_series(run.metrics, "loss"), color=color, lw=1, label=f"{run.name} train")
        vx, vy = _series(run.metrics, "val_loss")
        if vx:
            ax.plot(vx, vy, color=color, ls="--", marker="o", ms=4, label=f"{run.name} held-out")
        for seg in stage_segments(run.metrics)[1:]:
            ax.axvline(seg.start_tokens, color=color, ls=":", lw=1.2)
            ax.annotate(
                seg.name,
                xy=(seg.start_tokens, 0.98),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
                color=color,
            )
    bottom, top = ax.get_ylim()
    for i, run in enumerate(runs):
        at = {r.get("step"): r.get("tokens") for r in run.metrics}
        events = [(at.get(e.get("step"), e.get("tokens")), e.get("loss")) for e in run.events]
        points = [(x, y if _number(y) and y < top else top) for x, y in events if _number(x)]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(
                xs,
                ys,
                marker="X",
                s=80,
                color=f"C{i % 10}",
                edgecolors="black",
                zorder=3,
                clip_on=False,
                label=f"{run.name} guard events",
            )
    ax.set_ylim(bottom, top)
    ax.set(ylabel="loss (nats)", title="Loss")
    _tokens_axis(ax)
    return _png(fig)


Panel = tuple[str, str, str, float]
"""(metrics key, y label, y scale, factor)."""


def plot_panels(runs: list[RunData], panels: list[Panel], steps: bool = False) -> bytes | None:
    """One subplot per metric, one line per run, against tokens; None if no run has any."""
    panels = [p for p in panels if any(_series(r.metrics, p[0])[0] for r in runs)]
    if not panels:
        return None
    fig = _figure(len(panels), 2.8)
    for k, (key, label, scale, factor) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, k + 1)
        for i, run in enumerate(runs):
            xs, ys = _series(run.metrics, key, factor)
            ax.plot(
                xs,
                ys,
                color=f"C{i % 10}",
                lw=1.2,
                label=run.name,
                drawstyle="steps-pre" if steps else "default",
            )
        values = [y for r in runs for y in _series(r.metrics, key, factor)[1]]
        if scale == "log" and values and min(values) > 0:
            ax.set_yscale("log")
        ax.set_ylabel(label)
        _tokens_axis(ax)
    return _png(fig)


def plot_mixture(runs: list[RunData]) -> bytes | None:
    """Per run, each source's share of every logged interval, stacked (sources keep one colour
    across runs)."""
    with_data = [(r, *mixture_intervals(r.metrics)) for r in runs]
    with_data = [(r, xs, shares) for r, xs, shares in with_data if xs]
    if not with_data:
        return None
    sources = sorted({s for _, _, shares in with_data for s in shares})
    colors = {s: f"C{j % 10}" for j, s in enumerate(sources)}
    fig = _figure(len(with_data), 2.6)
    for k, (run, xs, shares) in enumerate(with_data):
        ax = fig.add_subplot(len(with_data), 1, k + 1)
        names = list(shares)
        ax.stackplot(
            [0, *xs],
            *[[v[0], *v] for v in shares.values()],
            labels=names,
            colors=[colors[s] for s in names],
            step="pre",
        )
        for seg in stage_segments(run.metrics)[1:]:
            ax.axvline(seg.start_tokens, color="black", ls=":", lw=1)
        ax.set(ylim=(0, 1), ylabel="share of tokens", title=run.name)
        _tokens_axis(ax)
    return _png(fig)


def plot_loss_by_position(runs: list[RunData]) -> bytes | None:
    found = [(i, r, r.files.get("loss_by_position", {})) for i, r in enumerate(runs)]
    found = [(i, r, d) for i, r, d in found if isinstance(d.get("loss"), list) and d["loss"]]
    if not found:
        return None
    fig = _figure(1, 4)
    ax = fig.add_subplot()
    for i, run, data in found:
        ax.plot(
            range(1, len(data["loss"]) + 1), data["loss"], color=f"C{i % 10}", lw=1, label=run.name
        )
        if _number(data.get("train_seq_len")):
            ax.axvline(data["train_seq_len"], color=f"C{i % 10}", ls="--", lw=1)
    ax.set(
        xscale="log",
        xlabel="token position",
        ylabel="loss (nats)",
        title="Loss by position (dashed: training length)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


# ---------------------------------------------------------------------------- HTML


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
        speeds = [x["tok_per_s"] for x in later if _number(x.get("tok_per_s"))]
        mfus = [x["mfu"] * 100 for x in later if _number(x.get("mfu"))]
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
        if not _number(value):
            return None
        return f"{value:.4f} ± {stderr:.4f}" if _number(stderr) else f"{value:.4f}"

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
    if _number(data.get("accuracy")):
        parts.append(f"exact match {data['accuracy']:.1%}")
    if _number(data.get("rope_theta")):
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
