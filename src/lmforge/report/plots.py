"""The report's matplotlib plots, each returned as PNG bytes (None when no run has the data)."""

from __future__ import annotations

import io
from typing import Any

from lmforge.report.run import RunData, is_number, mixture_intervals, stage_segments


def _figure(panels: int, height: float = 3.6) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(11, height * panels), layout="constrained")


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def _series(records: list[dict[str, Any]], key: str, scale: float = 1.0) -> tuple[list, list]:
    pairs = [(r["tokens"], r[key] * scale) for r in records if is_number(r.get(key))]
    pairs = [(x, y) for x, y in pairs if is_number(x)]
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
        points = [(x, y if is_number(y) and y < top else top) for x, y in events if is_number(x)]
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
        if is_number(data.get("train_seq_len")):
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
