"""`lmforge report` and `lmforge runs` on two tiny two-stage runs: the data read back, the page
opened in a real headless Chromium (no console errors, plots on screen), and missing or broken
pieces turned into notes."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmforge import pipeline, report
from lmforge.cli import main
from lmforge.eval.needle import plot_heatmap
from lmforge.recipe import load_recipe
from tests.conftest import TINY_OVERRIDES

STAGED = [
    *TINY_OVERRIDES,
    "train.precision=fp32",
    "train.save_every_steps=100",
    "train.log_every_steps=1",
    "eval.every_steps=2",
    "stages=[{name: short, tokens: 1024, warmup_tokens: 512, end_lr: 0.0003,"
    "  mixture: {english: 0, chinese: 0, code: 1}},"
    " {name: long, tokens: 1024, seq_len: 128, rope_theta: 40000, lr_schedule: linear,"
    "  mixture: {code: 0, chinese: 1}}]",
]
"""2 steps of code at T=64, then 2 of Chinese at T=128 with a larger RoPE base."""

C0, C1 = (31, 119, 180), (255, 127, 14)
"""matplotlib's first two line colours: run a's and run b's curves."""


@pytest.fixture(scope="module")
def runs_root(prepared_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/a: finished (4 steps) with eval outputs; runs/b: another seed stopped at step 3,
    with one guard event (a non-finite loss) written as the guard writes them."""
    root = tmp_path_factory.mktemp("report") / "runs"
    for name, extra in (("a", []), ("b", ["seed=7", "train.stop_at_step=3"])):
        shutil.copytree(prepared_run, root / name)
        pipeline.pretrain_stage(load_recipe(None, [*STAGED, f"run_dir={root / name}", *extra]))
    a = load_recipe(None, [*STAGED, f"run_dir={root / 'a'}"])
    pipeline.position_stage(a, 128, max_docs=2)
    pipeline.tokenizer_report_stage(a, [], max_bytes_per_source=4000)
    needle = {"variant": "passkey", "lengths": [256, 512], "depths": [0, 50, 100]}
    needle |= {"exact": [[1, 0], [1, 0], [0, 0]], "answer_token_prob": [[0.9, 0.1]] * 3}
    needle |= {"accuracy": 1 / 3, "rope_theta": 40000.0, "train_seq_len": 128}
    (root / "a" / "needle_passkey.json").write_text(json.dumps(needle))
    plot_heatmap(needle, root / "a" / "needle_passkey.png", train_len=128)
    eval_json = {"checkpoint": "x/step_00000004", "val_loss": 6.1, "val_ppl": 446.0}
    eval_json |= {"val_bpb": 4.8, "english": {"loss": 6.0, "ppl": 403.4, "bpb": 4.4}}
    (root / "a" / "eval.json").write_text(json.dumps(eval_json))
    arc = {"acc": 0.25, "acc_stderr": 0.04, "acc_norm": 0.26, "acc_norm_stderr": 0.04}
    bench = {"tasks": {"arc_easy": arc | {"n": 100, "num_fewshot": 0}}}
    bench["averages"] = {"commonsense": {"acc": 0.25, "acc_norm": 0.26, "tasks": 1}}
    (root / "a" / "benchmarks.json").write_text(json.dumps(bench))
    event = {"step": 2, "tokens": 512, "stage": "short", "kind": "non_finite", "z": None}
    event |= {"loss": float("inf"), "grad_norm": 1.0, "action": "skip_update", "rows": [8, 16]}
    (root / "b" / "events.jsonl").write_text(json.dumps(event) + "\n")
    return root


def test_a_run_reads_into_stages_status_and_mixture(runs_root: Path) -> None:
    a, b = report.read_runs([runs_root / "a", runs_root / "b"])
    segments = report.stage_segments(a.metrics)
    assert [(s.name, s.start_tokens, s.end_tokens, s.seq_len, s.rope_theta) for s in segments] == [
        ("short", 0, 1024, 64, 10_000.0),
        ("long", 1024, 2048, 128, 40_000.0),
    ]
    status = report.run_status(a)
    assert status["steps"] == status["planned"] == 4 and status["finished"]
    assert status["checkpoint"] == "step_00000004" and status["val_loss"] > 0
    assert report.run_status(b) | {"loss": None, "val_loss": None} == {
        "run": "b",
        "path": str(runs_root / "b"),
        "steps": 3,
        "planned": 4,
        "tokens": 1536,
        "stage": "long",
        "checkpoint": "step_00000003",
        "loss": None,
        "val_loss": None,
        "finished": False,
        "data_exhausted": False,
        "events": 1,
    }
    mixture = report.mixture_by_stage(a.metrics)
    assert mixture["short"] == {"english": 0, "chinese": 0, "code": 1024}
    assert mixture["all"]["code"] + mixture["all"]["chinese"] == 2048
    assert {"eval", "benchmarks", "loss_by_position", "tokenizer_report"} <= set(a.files)
    assert set(a.pngs) == {"needle_passkey", "tokenizer_report"} and not a.notes


def test_runs_lists_every_run_with_its_status(
    runs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["runs", str(runs_root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| run | steps | tokens | stage | latest checkpoint |")
    a, b = (line.split(" | ") for line in lines[2:])
    assert a[:5] == [f"| {runs_root / 'a'}", "4/4", "2,048", "long", "step_00000004"]
    assert a[-2:] == ["yes", "0 |"] and b[1] == "3/4" and b[-2:] == ["no", "1 |"]
    assert main(["runs", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"no runs under {tmp_path}\n"
    assert main(["runs", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err


# ------------------------------------------------------------------------- in a real browser


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("LMFORGE_REQUIRE_BROWSER"):  # set by .ci/run, which installs it
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("needs Debian's chromium (apt-get install chromium); CI runs this test")
    return found


def open_in_chromium(page: Path, tmp_path: Path, height: int) -> tuple[list[str], np.ndarray]:
    """Load the page headless; return its console messages (Chromium logs each one, whatever
    its level, as a CONSOLE line) and a screenshot of the top 1280 x height pixels."""
    shot = tmp_path / f"{page.stem}.png"
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu"]
    command += ["--disable-background-networking", "--disable-component-update"]
    command += ["--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
    command += ["--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    command += ["--enable-logging=stderr", "--v=0", f"--window-size=1280,{height}"]
    command += [f"--screenshot={shot}", page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-3000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return console, np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)


def pixels_of(shot: np.ndarray, color: tuple[int, int, int]) -> int:
    return int((np.abs(shot - np.array(color)).sum(axis=-1) < 40).sum())


def check_self_contained(html: str) -> int:
    """No script, no external reference; every image an inline PNG that decodes."""
    assert "<script" not in html and not re.search(r'(src|href)="(?!data:|#)', html)
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)">', html)
    assert len(images) == html.count("<img")
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    return len(images)


def test_the_browser_check_sees_console_errors(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    script = '<script>console.error("boom"); undefinedFunction();</script>'
    page.write_text(f'<!DOCTYPE html><link rel="icon" href="data:,"><p>x</p>{script}')
    console, _ = open_in_chromium(page, tmp_path, 300)
    assert len(console) == 2 and "boom" in console[0] and "undefinedFunction" in console[1]


def test_report_of_one_run_renders_in_chromium(
    runs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(runs_root / "a"), "--out", str(tmp_path / "out")]) == 0
    page = Path(capsys.readouterr().out.strip())
    assert page == tmp_path / "out" / "report.html"
    html = page.read_text(encoding="utf-8")
    # loss, lr+grad norm, throughput, stages, mixture, loss by position, NIAH, tokenizer
    assert check_self_contained(html) == 8
    for text in ("step_00000004", "arc_easy", "0.2500 ± 0.0400", "commonsense average"):
        assert text in html
    assert "a: no sft_data.json" in html and "could not be drawn" not in html
    assert "stages:\n- name: short" in html  # the recipe, verbatim
    console, shot = open_in_chromium(page, tmp_path, 2400)
    assert console == []
    assert shot.std() > 10 and (shot.sum(axis=-1) < 720).mean() > 0.02  # not a blank page
    assert pixels_of(shot, C0) > 2000  # the plots themselves are on screen


def test_report_of_two_runs_overlays_them(runs_root: Path, tmp_path: Path) -> None:
    assert main(["report", str(runs_root / "a"), str(runs_root / "b")]) == 0
    page = runs_root / "report_a_vs_b" / "report.html"
    html = page.read_text(encoding="utf-8")
    assert check_self_contained(html) == 8  # both runs share each curve's plot
    assert "<h3>Differences</h3>" in html and "train.stop_at_step" in html
    assert "non_finite" in html and "b: no eval.json" in html
    console, shot = open_in_chromium(page, tmp_path, 1600)
    assert console == []
    assert pixels_of(shot, C0) > 800 and pixels_of(shot, C1) > 800  # a's and b's curves


# ------------------------------------------------------------------------- missing pieces


def test_missing_and_broken_pieces_become_notes(runs_root: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"  # killed early: metrics only, a torn last line
    partial.mkdir()
    lines = (runs_root / "a" / "metrics.jsonl").read_text().splitlines()
    (partial / "metrics.jsonl").write_text("\n".join(lines[:2]) + '\n{"step": 3, "to')
    (partial / "eval.json").write_text("{not json")
    (partial / "benchmarks.json").write_text(json.dumps({"tasks": [1, 2]}))  # a wrong shape
    fresh = tmp_path / "fresh"  # the recipe saved, no step taken yet
    fresh.mkdir()
    shutil.copy(runs_root / "a" / "recipe.yaml", fresh / "recipe.yaml")
    runs = report.read_runs([partial, fresh])
    assert runs[0].notes[0] == "metrics.jsonl: 1 unreadable line(s) skipped"
    assert runs[0].notes[1].startswith("eval.json: unreadable")
    assert report.run_status(runs[1]) | {"path": ""} == {
        "run": "fresh",
        "path": "",
        "steps": 0,
        "planned": 4,
        "tokens": None,
        "stage": None,
        "checkpoint": None,
        "loss": None,
        "val_loss": None,
        "finished": False,
        "data_exhausted": False,
        "events": 0,
    }
    html = report.render_html(runs)
    check_self_contained(html)
    for note in (
        "partial: metrics.jsonl: 1 unreadable line(s) skipped",
        "partial: no recipe.yaml",
        "fresh: no metrics.jsonl (training has not started)",
        "partial: no tokenizer_report/",
        "this section could not be drawn",  # the benchmarks of a wrong shape
    ):
        assert note in html, note
    assert report.status_row(report.run_status(runs[0]))[1] == "2/?"


def test_a_folder_that_is_not_a_run_is_a_one_line_error(
    prepared_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(prepared_run), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"lmforge report: error: {prepared_run}: not a run dir (no metrics.jsonl, recipe.yaml"
        " or checkpoints/ in it)\n"
    )
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.endswith("nowhere: no such directory\n")
    assert not (tmp_path / "report.html").exists()


def test_stages_of_metrics_that_begin_after_step_1_start_where_their_first_step_did() -> None:
    """A run dir copied without its first steps: the first stage's tokens are not from 0."""
    records = [
        {"step": 3, "tokens": 1536, "stage": "long"},
        {"step": 4, "tokens": 2048, "stage": "long"},
        {"step": 5, "tokens": 3072, "stage": "longer"},
    ]
    first, second = report.stage_segments(records)
    assert (first.start_tokens, first.end_tokens) == (1024, 2048)
    assert (second.start_tokens, second.end_tokens) == (2048, 3072)
    assert report.stage_segments(records[:1])[0].start_tokens == 1536  # unknown: from its end
    assert report.stage_segments([{"step": 1, "tokens": 512}])[0].start_tokens == 0
