"""Benchmark requests: every shared dataset loads, and matches what lm-eval itself builds.

Parity tests build lm-eval's own task object offline (its YAML, with `dataset_path: json` over
our documents written to a temporary file) and compare its (context, continuation) requests
with ours string for string; they are skipped when `lm_eval` is not installed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from lmforge.eval import tasks
from lmforge.eval.tasks import TASKS, Request, TaskFormatError, load_docs, load_task

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval"
FLAT = ["arc_easy", "arc_challenge", "boolq", "copa", "hellaswag", "openbookqa", "piqa", "sciq"]
FLAT += ["winogrande"]
GROUPS = ["mmlu", "cmmlu", "ceval"]
LM_EVAL_YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "copa": "super_glue/copa/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
    "sciq": "sciq/sciq.yaml",
    "winogrande": "winogrande/default.yaml",
    "mmlu": "mmlu/default/mmlu_{}.yaml",
    "cmmlu": "cmmlu/cmmlu_{}.yaml",
    "ceval": "ceval/ceval-valid_{}.yaml",
}

# Real Rowan/hellaswag validation rows (ind 116, 117, 149, 170, 180), all in the shared
# 70% subset, as published in rowanz/hellaswag data/hellaswag_val.jsonl.
HELLASWAG_RAW = [
    (
        "High jump",
        "The boy lifts his body above the height of a pole. "
        "The boy lands on his back on to a red mat.",
        "the boy",
        1,
        [
            "turns his body around on the mat.",
            "gets up from the mat.",
            "continues to lift his body over the pole.",
            "wiggles out of the mat.",
        ],
    ),
    (
        "High jump",
        "The boy lands on his back on to a red mat. The boy gets up from the mat.",
        "the boy",
        1,
        [
            "starts doing spins.",
            "celebrates by clapping and flexing both arms.",
            "is dancing on the mat.",
            "does jump jacks on his stick.",
        ],
    ),
    (
        "Playing harmonica",
        "A man is standing in front of a camera. He starts playing a harmonica for the camera.",
        "he",
        2,
        [
            "begins to play the harmonica with his body while looking at the camera.",
            "seems to be singing while playing the harmonica.",
            "rocks back and forth to the music as he goes.",
            "painted a fence in front of the camera.",
        ],
    ),
    (
        "Sumo",
        "A cartoon animation video is shown with people wandering around and rockets being shot.",
        "two men",
        0,
        [
            "fight robots of evil and ends with a to be continued.",
            "are then shown in closeups shooting a shot put.",
            "push a child in a speedboat in the water.",
            "look in the cameraman's eye and smile.",
        ],
    ),
    (
        "Sharpening knives",
        "A man is holding a pocket knife while sitting on some rocks in the wilderness.",
        "then he",
        1,
        [
            "opens a can of oil put oil on the knife, and puts oil on a knife and press it "
            "through a can filled with oil then cuts several pieces from the sandwiches.",
            "takes a small stone from the flowing river and smashes it on another stone.",
            "uses the knife to shave his leg.",
            "sand the rocks and tops them by using strong pressure.",
        ],
    ),
]
# A WikiHow-style row (made up) exercising the markup rules: leading "[step]", " [title]".
HELLASWAG_WIKIHOW = {
    "activity_label": "Home and Garden",
    "ctx_a": "[header] How to pot a plant [title] Pick a pot. [step] Choose one  with holes.",
    "ctx_b": "",
    "endings": ["[step] Fill it with soil.", "Water it [title] daily.", "x [substeps] y", "Wait."],
    "label": "0",
}


def _yaml_for(name: str) -> str:
    """lm-eval's YAML for a task or subtask name (`mmlu_anatomy`, `ceval-valid_law`)."""
    if name in LM_EVAL_YAML:
        return LM_EVAL_YAML[name]
    group = TASKS[name].kind
    return LM_EVAL_YAML[group].format(name.removeprefix(tasks._SUBTASK_PREFIX[group]))


def _raw_hellaswag() -> list[dict[str, Any]]:
    rows = [
        {"activity_label": a, "ctx_a": ca, "ctx_b": cb, "endings": e, "label": str(g)}
        for a, ca, cb, g, e in HELLASWAG_RAW
    ]
    return rows + [HELLASWAG_WIKIHOW]


def _folder(name: str) -> Path:
    folder = DATA / name
    if not folder.is_dir():
        pytest.skip(f"shared data folder {folder} is missing")
    return folder


def _source_counts(folder: Path) -> dict[str, int]:
    """`file -> records` from the table in the folder's SOURCE.md."""
    counts = {}
    for line in (folder / "SOURCE.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and cells[2].isdigit():
            counts[cells[0]] = int(cells[2])
    return counts


def _check_well_formed(requests: list[Request]) -> None:
    for r in requests:
        n = len(r.continuations)
        assert n >= 2 and len(r.contexts) == n and len(r.choice_texts) == n
        assert 0 <= r.gold < n
        assert all(c.startswith(" ") for c in r.continuations)


def _write_jsonl(path: Path, docs: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), "utf-8")
    return str(path)


# ---------------------------------------------------------------- loading the shared data


def test_every_shared_dataset_is_a_known_task() -> None:
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is missing")
    folders = {p.name for p in DATA.iterdir() if p.is_dir()}
    expected = {f for f in folders if f != "humaneval" and not f.startswith("niah_")}
    assert expected <= TASKS.keys()


@pytest.mark.parametrize("name", FLAT)
def test_every_file_loads_with_its_source_md_count(name: str) -> None:
    folder = _folder(name)
    counts = _source_counts(folder)
    assert counts, f"{folder}/SOURCE.md lists no files"
    for file, records in counts.items():
        data = load_task(name, folder / file)
        assert len(data.requests) == records, file
        _check_well_formed(data.requests)


@pytest.mark.parametrize("name", GROUPS)
def test_subject_folders_load_with_source_md_counts(name: str) -> None:
    folder = _folder(name)
    counts = _source_counts(folder)
    split = TASKS[name].eval_split
    eval_records = sum(n for f, n in counts.items() if f.startswith(f"{split}/"))
    dev_records = sum(n for f, n in counts.items() if f.startswith("dev/"))
    data = load_task(name, folder)
    assert data.num_fewshot == 5
    assert len(data.requests) == eval_records
    _check_well_formed(data.requests)
    subtasks = load_docs(name, folder, fewshot=True)
    assert len(subtasks) == len(TASKS[name].subjects)
    assert sum(len(s.fewshot_docs or []) for s in subtasks) == dev_records


def test_folder_default_prefers_lm_eval_layout_over_reformatted_file() -> None:
    # arc's test.jsonl is llm-foundry's {"query", "choices", "gold"}; validation.jsonl is HF's
    counts = _source_counts(_folder("arc_easy"))
    assert len(load_task("arc_easy", DATA / "arc_easy").requests) == counts["validation.jsonl"]


def test_limit_takes_first_docs_and_applies_per_subject() -> None:
    full = load_task("piqa", _folder("piqa"))
    assert load_task("piqa", DATA / "piqa", limit=7).requests == full.requests[:7]
    data = load_task("ceval", _folder("ceval"), limit=2)
    assert len(data.requests) == 2 * len(TASKS["ceval"].subjects)
    with pytest.raises(ValueError, match="limit=0 >= 1"):
        load_task("piqa", DATA / "piqa", limit=0)


def test_a_task_with_no_documents_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "validation.jsonl").write_text("\n")
    with pytest.raises(TaskFormatError, match="piqa: no documents to score"):
        load_task("piqa", tmp_path)


def test_llm_foundry_arc_query_gives_lm_eval_prompt(tmp_path: Path) -> None:
    icl = {"query": "Question: Which is a gas?", "choices": ["ice", "steam"], "gold": 1}
    hf = {
        "question": "Which is a gas?",
        "choices": {"text": ["ice", "steam"], "label": ["A", "B"]},
        "answerKey": "B",
    }
    a = load_task("arc_easy", _write_jsonl(tmp_path / "a.jsonl", [icl])).requests
    b = load_task("arc_easy", _write_jsonl(tmp_path / "b.jsonl", [hf])).requests
    assert a == b
    assert a[0].contexts[0] == "Question: Which is a gas?\nAnswer:"
    assert a[0].continuations == (" ice", " steam")


def test_unknown_fields_name_the_file_and_line(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "x.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, {"q": 1}]
    )
    with pytest.raises(TaskFormatError, match=r"x\.jsonl:2: fields \['q'\] match no piqa"):
        load_task("piqa", path)
    bad = tmp_path / "h.txt"
    bad.write_text("ctx\n1\na\nb\n", encoding="utf-8")
    with pytest.raises(TaskFormatError, match="not 6 per task"):
        load_task("hellaswag", bad)
    with pytest.raises(KeyError, match="unknown task"):
        load_task("nope")


def test_task_files_split_at_newlines_only_and_name_bad_bytes(tmp_path: Path) -> None:
    """A raw U+2028 inside a JSON string is valid JSON, not a line break; a byte that is not
    UTF-8 is named by file and line."""
    record = {"goal": "a\u2028b", "sol1": "x", "sol2": "y", "label": 0}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n" + json.dumps(record) + "\n")
    assert len(load_task("piqa", path).requests) == 2
    path.write_bytes(path.read_bytes() + b'{"goal": "caf\xe9"}\n')
    with pytest.raises(TaskFormatError, match=r"p\.jsonl:3: not valid JSON \('utf-8' codec"):
        load_task("piqa", path)


def test_few_shot_without_pool_is_a_clear_error() -> None:
    with pytest.raises(TaskFormatError, match="'train' split"):
        load_task("piqa", _folder("piqa"), num_fewshot=2)


def test_default_path_loads_the_hub_dataset_lm_eval_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []
    row = {"question": "Q", "choices": ["a", "b", "c", "d"], "answer": 2}

    def fake_load_dataset(path: str, name: str | None, split: str) -> list[dict[str, Any]]:
        calls.append((path, name, split))
        return [row] * 6

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_task("mmlu_anatomy", num_fewshot=2)
    assert calls == [("cais/mmlu", "anatomy", "test"), ("cais/mmlu", "anatomy", "dev")]
    assert data.requests[0].contexts[0].startswith("The following are multiple choice questions")
    calls.clear()
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda path, name, split: calls.append((path, name, split)) or [],
    )
    for name in ("winogrande", "hellaswag"):
        with pytest.raises(TaskFormatError, match=f"{name}: no documents to score"):
            load_task(name)
    assert calls == [
        ("allenai/winogrande", "winogrande_xl", "validation"),
        ("Rowan/hellaswag", None, "validation"),
    ]


# ---------------------------------------------------------------- hellaswag preprocessing


def test_hellaswag_from_hf_rows_capitalizes_ctx_b_and_strips_markup(tmp_path: Path) -> None:
    docs = load_docs("hellaswag", _write_jsonl(tmp_path / "validation.jsonl", _raw_hellaswag()))
    first, wikihow = docs[0].docs[0], docs[0].docs[-1]
    assert first["query"].endswith("on to a red mat. The boy")
    expected = "Home and Garden: How to pot a plant. Pick a pot. Choose one with holes."
    assert wikihow["query"] == expected
    assert wikihow["choices"][0] == " Fill it with soil."  # lm-eval keeps this leading space


def test_hellaswag_text_file_reconstructs_lm_eval_query() -> None:
    folder = _folder("hellaswag")
    by_choices = {tuple(d["choices"]): d for d in load_docs("hellaswag", folder)[0].docs}
    for label, ctx_a, ctx_b, gold, endings in HELLASWAG_RAW:
        doc = by_choices[tuple(endings)]
        assert doc["query"] == f"{label}: {ctx_a} {ctx_b.capitalize()}"
        assert doc["gold"] == gold


# ---------------------------------------------------------------- parity with lm-eval itself


def _lm_eval_task(
    yaml: str,
    splits: dict[str, list[dict[str, Any]]],
    num_fewshot: int,
    tmp_path: Path,
    **over: Any,
) -> Any:
    """lm-eval's ConfigurableTask from its own YAML, reading `splits` from local JSONL files."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = dict(load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml, resolve_func=True))
    for key in ("tag", "group"):
        cfg.pop(key, None)
    tmp_path.mkdir(parents=True, exist_ok=True)
    files = {s: _write_jsonl(tmp_path / f"lm_eval_{s}.jsonl", d) for s, d in splits.items()}
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if cfg.get(key) is not None and cfg[key] not in splits:
            cfg[key] = None
    cfg.update(
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": files, "cache_dir": str(tmp_path / "hf_cache")},
        num_fewshot=num_fewshot,
        **over,
    )
    task = ConfigurableTask(config=cfg)
    task.set_fewshot_seed(1234)  # what lm_eval.evaluator does with its default fewshot seed
    return task


def _lm_eval_requests(task: Any, limit: int) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    task.build_all_requests(limit=limit)
    per_doc: dict[int, list[Any]] = {}
    for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        per_doc.setdefault(inst.doc_id, []).append(inst.arguments)
    return [
        (tuple(a[0] for a in args), tuple(a[1] for a in args))
        for _, args in sorted(per_doc.items())
    ]


def _lm_eval_gold_and_choices(task: Any, doc: dict[str, Any]) -> tuple[int, tuple[str, ...]]:
    """As lm-eval's process_results resolves them (a string target is looked up in the choices)."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    choices = tuple(task.doc_to_choice(doc))
    return (choices.index(gold) if isinstance(gold, str) else gold), choices


def _assert_same(ours: list[Request], task: Any, limit: int) -> None:
    theirs = _lm_eval_requests(task, limit)
    assert len(ours) == len(theirs) == min(limit, len(task.eval_docs))
    for i, (request, (contexts, continuations)) in enumerate(zip(ours, theirs, strict=True)):
        assert request.contexts == contexts, f"doc {i}"
        assert request.continuations == continuations, f"doc {i}"
        gold, choices = _lm_eval_gold_and_choices(task, task.eval_docs[i])
        assert (request.gold, request.choice_texts) == (gold, choices), f"doc {i}"


@pytest.mark.parametrize("name", FLAT)
def test_zero_shot_requests_equal_lm_eval(name: str, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    folder = _folder(name)
    (sub,) = load_docs(name, folder)
    over = {"process_docs": None} if name == "hellaswag" else {}  # our docs are processed
    splits = {TASKS[name].eval_split: sub.docs}
    task = _lm_eval_task(LM_EVAL_YAML[name], splits, 0, tmp_path, **over)
    _assert_same(load_task(name, folder, limit=40).requests, task, 40)


@pytest.mark.parametrize(
    ("name", "subjects"),
    [
        ("mmlu", ["abstract_algebra", "high_school_european_history", "moral_scenarios"]),
        ("cmmlu", ["agronomy", "chinese_literature"]),
        ("ceval", ["accountant", "law"]),
    ],
)
def test_subject_requests_equal_lm_eval_five_and_zero_shot(
    name: str, subjects: list[str], tmp_path: Path
) -> None:
    pytest.importorskip("lm_eval")
    folder = _folder(name)
    spec = TASKS[name]
    for subject in subjects:
        subtask = tasks._SUBTASK_PREFIX[spec.kind] + subject
        (sub,) = load_docs(subtask, folder, fewshot=True)
        splits = {spec.eval_split: sub.docs, "dev": sub.fewshot_docs or []}
        for shots in (5, 0):  # the subject description comes first even with no examples
            task = _lm_eval_task(_yaml_for(subtask), splits, shots, tmp_path / f"{subject}{shots}")
            ours = load_task(subtask, folder, num_fewshot=shots, limit=6).requests
            _assert_same(ours, task, 6)


@pytest.mark.parametrize(
    ("name", "shots"),
    [("arc_easy", 3), ("boolq", 2), ("copa", 3), ("winogrande", 2), ("hellaswag", 1)],
)
def test_random_few_shot_draws_equal_lm_eval(name: str, shots: int, tmp_path: Path) -> None:
    """Few-shot from a train split, seeded as lm-eval does; boolq/copa/hellaswag/winogrande have
    no test split, so lm-eval also drops the eval doc from each draw: the pool here contains
    some eval docs to exercise that."""
    pytest.importorskip("lm_eval")
    spec = TASKS[name]
    (sub,) = load_docs(name, _folder(name))
    eval_docs, train = sub.docs[:12], sub.docs[:4] + sub.docs[30:60]
    local = tmp_path / "ours"
    local.mkdir()
    _write_jsonl(local / spec.local_files[0], eval_docs)
    _write_jsonl(local / "train.jsonl", train)
    over = {"process_docs": None} if name == "hellaswag" else {}
    splits = {spec.eval_split: eval_docs, "train": train}
    task = _lm_eval_task(LM_EVAL_YAML[name], splits, shots, tmp_path, **over)
    _assert_same(load_task(name, local, num_fewshot=shots, limit=10).requests, task, 10)


def test_hellaswag_hf_rows_processed_as_lm_eval(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    path = _write_jsonl(tmp_path / "validation.jsonl", _raw_hellaswag())
    task = _lm_eval_task(LM_EVAL_YAML["hellaswag"], {"validation": _raw_hellaswag()}, 0, tmp_path)
    _assert_same(load_task("hellaswag", path).requests, task, 100)


@pytest.mark.parametrize(
    ("name", "folder"),
    [("arc_easy", "arc_easy"), ("hellaswag", "hellaswag"), ("ceval-valid_accountant", "ceval")],
)
def test_acc_norm_divides_by_choice_text_length(name: str, folder: str, tmp_path: Path) -> None:
    """lm-eval's own process_results picks the same acc_norm choice as lls / len(choice_texts)."""
    pytest.importorskip("lm_eval")
    (sub,) = load_docs(name, _folder(folder))
    over = {"process_docs": None} if name == "hellaswag" else {}
    task = _lm_eval_task(_yaml_for(name), {TASKS[name].eval_split: sub.docs}, 0, tmp_path, **over)
    rng = random.Random(0)
    requests = load_task(name, DATA / folder, num_fewshot=0, limit=30).requests
    for doc, request in zip(task.eval_docs, requests, strict=False):
        lls = [-rng.uniform(1, 30) for _ in request.choice_texts]
        scores = [ll / len(t) for ll, t in zip(lls, request.choice_texts, strict=True)]
        ours = float(scores.index(max(scores)) == request.gold)
        assert task.process_results(doc, [(ll, False) for ll in lls])["acc_norm"] == ours
