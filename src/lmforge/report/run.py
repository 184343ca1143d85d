"""Reading a run dir into RunData, and the values derived from it (stages, mixture, status).

A piece a run lacks is left empty and a file that cannot be read becomes a note; a folder that
is not a run at all is a RunDirError. `run_status` is the state `lmforge runs` prints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.checkpoint_dirs import completed_checkpoints
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
    data_exhausted: bool = False
    """The newest checkpoint is where training stopped because the data ran out."""
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
        trainer = _trainer_json(ckpt)
        run.checkpoints.append((ckpt.name, _checkpoint_step(ckpt, trainer)))
        run.data_exhausted = bool(trainer.get("data_exhausted"))
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


def _trainer_json(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's trainer.json ({} if unreadable: the report shows what it can)."""
    try:
        trainer = json.loads((ckpt / "trainer.json").read_text())
    except (OSError, ValueError):
        return {}
    return trainer if isinstance(trainer, dict) else {}


def _checkpoint_step(ckpt: Path, trainer: dict[str, Any]) -> int:
    try:
        return int(trainer["step"])
    except (KeyError, ValueError, TypeError):
        digits = ckpt.name.removeprefix("step_")
        return int(digits) if digits.isdigit() else 0


# ---------------------------------------------------------------------------- derived values


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool): a value a metrics record holds when it was measured."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


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
    segments, start = [], _first_step_start(records)
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


def _first_step_start(records: list[dict[str, Any]]) -> int:
    """Tokens before the first record's step: 0 from step 1; for metrics that begin later (a
    run dir copied without its start) the first step's own batch back from its tokens, when two
    consecutive records show it."""
    if not records or records[0].get("step", 1) <= 1:
        return 0
    first = records[0]
    nxt = records[1] if len(records) > 1 else {}
    if nxt.get("step") == first["step"] + 1 and is_number(first.get("tokens")):
        return int(2 * first["tokens"] - nxt.get("tokens", first["tokens"]))
    return int(first.get("tokens", 0))


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
    is finished when its checkpoint at the planned last step exists, or its newest checkpoint
    is where the data ran out ("data exhausted")."""
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
        "finished": (run.planned_steps is not None and ckpt_step >= run.planned_steps)
        or run.data_exhausted,
        "data_exhausted": run.data_exhausted,
        "events": len(run.events),
    }


STATUS_HEADER = ["run", "steps", "tokens", "stage", "latest checkpoint", "loss", "val loss"]
STATUS_HEADER += ["finished", "guard events"]


def status_row(status: dict[str, Any]) -> list[Any]:
    """A run_status as a table row under STATUS_HEADER (steps as done/planned)."""
    planned = "?" if status["planned"] is None else f"{status['planned']:,}"
    keys = ("tokens", "stage", "checkpoint", "loss", "val_loss")
    done = "data exhausted" if status.get("data_exhausted") else "yes"
    done = done if status["finished"] else "no"
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
