"""The run report: one static HTML page showing what a run (or several, overlaid) did.

`run.read_run` gathers a run dir's files into a RunData: metrics.jsonl, events.jsonl,
recipe.yaml, checkpoints/, and the eval outputs that exist (eval.json, benchmarks.json,
needle_*.json/.png, loss_by_position.json, tokenizer_report/, sft_data.json). `plots` draws
RunData values as matplotlib PNGs; `html.render_html` lays them out with tables in one
self-contained page (base64 images, no script, nothing fetched), so the file opens offline and
can be mailed as it is. `run.run_status` is the state `lmforge runs` prints for each run.
"""

from lmforge.report.html import default_out, render_html, write_report
from lmforge.report.run import (
    STATUS_HEADER,
    RunData,
    RunDirError,
    find_runs,
    mixture_by_stage,
    read_run,
    read_runs,
    run_status,
    stage_segments,
    status_row,
)

__all__ = [
    "STATUS_HEADER",
    "RunData",
    "RunDirError",
    "default_out",
    "find_runs",
    "mixture_by_stage",
    "read_run",
    "read_runs",
    "render_html",
    "run_status",
    "stage_segments",
    "status_row",
    "write_report",
]
