"""The benchmark registry and loader: lm-evaluation-harness's multiple-choice tasks, rebuilt.

`TASKS` says where each lm-eval task's data live and how lm-eval draws its few-shot examples;
`load_task` reads the documents (a local file or folder, or with no path the Hugging Face
dataset lm-eval loads), draws the shots as lm-eval does and formats every request as lm-eval
v0.4.x does. Scoring these requests by log-likelihood gives lm-eval's acc and acc_norm on the
same documents. task_records.py maps local record layouts onto lm-eval's fields;
task_prompts.py formats documents into prompts and choices.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from lmforge.eval.task_prompts import Request, build_request
from lmforge.eval.task_records import (
    Doc,
    Kind,
    TaskFormatError,
    convert_records,
    in_lm_eval_layout,
    read_records,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TaskData:
    """Every request of one task, ready for log-likelihood scoring."""

    name: str
    """Task name as given to `load_task`."""
    requests: list[Request]
    """All requests, subject by subject (alphabetical) for MMLU-style groups."""
    num_fewshot: int
    """Few-shot examples in every context."""


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """Where one lm-eval task's data live and how lm-eval draws its few-shot examples."""

    kind: Kind
    """Record formats and prompt formatter; arc_easy and arc_challenge share one."""
    hf_path: str
    """Hugging Face dataset lm-eval loads (`dataset_path` in its YAML)."""
    hf_name: str | None = None
    """Dataset config (`dataset_name`); subject tasks use the subject instead."""
    eval_split: str
    """Split lm-eval scores: `test_split` if set, else `validation_split`; for MMLU-style tasks
    also the folder holding the per-subject files."""
    fewshot_split: str
    """Split lm-eval takes few-shot examples from: `fewshot_split`, else `training_split`."""
    fewshot_sampler: Literal["first_n", "random"] = "random"
    """`first_n`: the split's first k docs in order; `random`: `Random(seed).sample` as lm-eval's
    default ContextSampler (lm_eval/api/samplers.py), one generator over all docs in order."""
    exclude_eval_doc: bool = False
    """lm-eval samples k+1 and drops the scored doc when `fewshot_config.split == test_split`,
    which holds when both are None (lm_eval/api/task.py `fewshot_context`)."""
    local_files: tuple[str, ...] = ()
    """File names tried in a task folder, lm-eval's split first; the first in lm-eval's own
    field layout wins over reformatted ones (flat tasks only)."""
    num_fewshot: int = 0
    """Few-shot examples when the caller gives none."""
    subjects: tuple[str, ...] = ()
    """Subtasks of an MMLU-style group; each is its own lm-eval task (description, few-shot
    pool, and `limit`, which lm-eval applies per subtask)."""


@dataclass(frozen=True, kw_only=True)
class Subtask:
    """The documents of one lm-eval task: a whole flat task, or one subject of a group."""

    name: str
    """lm-eval's task name, e.g. `arc_easy` or `mmlu_anatomy`."""
    docs: list[Doc]
    """Scored documents in lm-eval's field layout (after its process_docs), in source order."""
    sources: list[str]
    """Where each doc came from (`file:line`), for error messages."""
    fewshot_docs: list[Doc] | None
    """The few-shot split in the same layout; None when not asked for."""
    description: str
    """Text lm-eval puts before everything else (MMLU-style subject line, else empty)."""


# Subject names are data from lm-eval's per-subject YAMLs (`dataset_name`, and the Chinese name
# inside each `description`): lm_eval/tasks/mmlu/default/mmlu_*.yaml, cmmlu/cmmlu_*.yaml,
# ceval/ceval-valid_*.yaml.
MMLU_SUBJECTS = tuple(
    """abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology
    college_chemistry college_computer_science college_mathematics college_medicine college_physics
    computer_security conceptual_physics econometrics electrical_engineering elementary_mathematics
    formal_logic global_facts high_school_biology high_school_chemistry
    high_school_computer_science high_school_european_history high_school_geography
    high_school_government_and_politics high_school_macroeconomics high_school_mathematics
    high_school_microeconomics high_school_physics high_school_psychology high_school_statistics
    high_school_us_history high_school_world_history human_aging human_sexuality international_law
    jurisprudence logical_fallacies machine_learning management marketing medical_genetics
    miscellaneous moral_disputes moral_scenarios nutrition philosophy prehistory
    professional_accounting professional_law professional_medicine professional_psychology
    public_relations security_studies sociology us_foreign_policy virology
    world_religions""".split()
)


def _pairs(text: str) -> dict[str, str]:
    return dict(item.split("=") for item in text.split())


CMMLU_SUBJECTS = _pairs(
    """agronomy=农学 anatomy=解剖学 ancient_chinese=古汉语 arts=艺术学 astronomy=天文学
    business_ethics=商业伦理 chinese_civil_service_exam=中国公务员考试
    chinese_driving_rule=中国驾驶规则 chinese_food_culture=中国饮食文化
    chinese_foreign_policy=中国外交政策 chinese_history=中国历史 chinese_literature=中国文学
    chinese_teacher_qualification=中国教师资格 clinical_knowledge=临床知识
    college_actuarial_science=大学精算学 college_education=大学教育学
    college_engineering_hydrology=大学工程水文学 college_law=大学法律 college_mathematics=大学数学
    college_medical_statistics=大学医学统计 college_medicine=大学医学 computer_science=计算机科学
    computer_security=计算机安全 conceptual_physics=概念物理学
    construction_project_management=建设工程管理 economics=经济学 education=教育学
    electrical_engineering=电气工程 elementary_chinese=小学语文 elementary_commonsense=小学常识
    elementary_information_and_technology=小学信息技术 elementary_mathematics=初等数学
    ethnology=民族学 food_science=食品科学 genetics=遗传学 global_facts=全球事实
    high_school_biology=高中生物 high_school_chemistry=高中化学 high_school_geography=高中地理
    high_school_mathematics=高中数学 high_school_physics=高中物理学 high_school_politics=高中政治
    human_sexuality=人类性行为 international_law=国际法学 journalism=新闻学 jurisprudence=法理学
    legal_and_moral_basis=法律与道德基础 logical=逻辑学 machine_learning=机器学习 management=管理学
    marketing=市场营销 marxist_theory=马克思主义理论 modern_chinese=现代汉语 nutrition=营养学
    philosophy=哲学 professional_accounting=专业会计 professional_law=专业法学
    professional_medicine=专业医学 professional_psychology=专业心理学 public_relations=公共关系
    security_study=安全研究 sociology=社会学 sports_science=体育学
    traditional_chinese_medicine=中医中药 virology=病毒学 world_history=世界历史
    world_religions=世界宗教"""
)
CEVAL_SUBJECTS = _pairs(
    """accountant=注册会计师 advanced_mathematics=高等数学 art_studies=艺术学
    basic_medicine=基础医学 business_administration=工商管理
    chinese_language_and_literature=中国语言文学 civil_servant=公务员 clinical_medicine=临床医学
    college_chemistry=大学化学 college_economics=大学经济学 college_physics=大学物理
    college_programming=大学编程 computer_architecture=计算机组成 computer_network=计算机网络
    discrete_mathematics=离散数学 education_science=教育学 electrical_engineer=注册电气工程师
    environmental_impact_assessment_engineer=环境影响评价工程师 fire_engineer=注册消防工程师
    high_school_biology=高中生物 high_school_chemistry=高中化学 high_school_chinese=高中语文
    high_school_geography=高中地理 high_school_history=高中历史 high_school_mathematics=高中数学
    high_school_physics=高中物理 high_school_politics=高中政治
    ideological_and_moral_cultivation=思想道德修养与法律基础 law=法学
    legal_professional=法律职业资格 logic=逻辑学
    mao_zedong_thought=毛泽东思想和中国特色社会主义理论体系概论 marxism=马克思主义基本原理
    metrology_engineer=注册计量师 middle_school_biology=初中生物 middle_school_chemistry=初中化学
    middle_school_geography=初中地理 middle_school_history=初中历史
    middle_school_mathematics=初中数学 middle_school_physics=初中物理
    middle_school_politics=初中政治 modern_chinese_history=近代史纲要 operating_system=操作系统
    physician=医师资格 plant_protection=植物保护 probability_and_statistics=概率统计
    professional_tour_guide=导游资格 sports_science=体育学 tax_accountant=税务师
    teacher_qualification=教师资格 urban_and_rural_planner=注册城乡规划师
    veterinary_medicine=兽医学"""
)
_SUBTASK_PREFIX = {"mmlu": "mmlu_", "cmmlu": "cmmlu_", "ceval": "ceval-valid_"}


def _description(kind: Kind, subject: str) -> str:
    """The `description` of lm-eval's per-subject YAML (templates from the files cited above)."""
    match kind:
        case "mmlu":
            topic = subject.replace("_", " ")
            return f"The following are multiple choice questions (with answers) about {topic}.\n\n"
        case "cmmlu":
            return (
                f"以下是关于{CMMLU_SUBJECTS[subject]}的单项选择题，请直接给出正确答案的选项。\n\n"
            )
        case "ceval":
            return (
                f"以下是中国关于{CEVAL_SUBJECTS[subject]}的单项选择题，请选出其中的正确答案。\n\n"
            )
    return ""


def _flat(kind: Kind, hf: str, name: str | None, split: str, files: tuple[str, ...]) -> TaskSpec:
    # Tasks without a test split score `validation`, and lm-eval then excludes the eval doc.
    return TaskSpec(
        kind=kind, hf_path=hf, hf_name=name, eval_split=split, fewshot_split="train",
        exclude_eval_doc=split != "test", local_files=files,
    )  # fmt: skip


def _group(kind: Kind, hf: str, split: str, subjects: Iterable[str]) -> TaskSpec:
    return TaskSpec(
        kind=kind, hf_path=hf, eval_split=split, fewshot_split="dev", fewshot_sampler="first_n",
        num_fewshot=5, subjects=tuple(sorted(subjects)),
    )  # fmt: skip


def _with_subtasks(tasks: dict[str, TaskSpec]) -> dict[str, TaskSpec]:
    """Add lm-eval's names for each subject (`mmlu_anatomy`, `ceval-valid_law`) and group."""
    out = dict(tasks, **{"ceval-valid": tasks["ceval"]})
    for spec in tasks.values():
        for subject in spec.subjects:
            out[_SUBTASK_PREFIX[spec.kind] + subject] = replace(spec, subjects=(subject,))
    return out


_TEST_FIRST = ("test.jsonl", "validation.jsonl")
_TOP_LEVEL: dict[str, TaskSpec] = {
    "arc_easy": _flat("arc", "allenai/ai2_arc", "ARC-Easy", "test", _TEST_FIRST),
    "arc_challenge": _flat("arc", "allenai/ai2_arc", "ARC-Challenge", "test", _TEST_FIRST),
    "boolq": _flat("boolq", "aps/super_glue", "boolq", "validation", ("validation.jsonl",)),
    "copa": _flat("copa", "aps/super_glue", "copa", "validation", ("validation.jsonl",)),
    "hellaswag": _flat(
        "hellaswag",
        "Rowan/hellaswag",
        None,
        "validation",
        ("validation.jsonl", "hellaswag_val.jsonl", "hellaswag_val_full.txt"),
    ),
    "openbookqa": _flat("openbookqa", "allenai/openbookqa", "main", "test", _TEST_FIRST),
    "piqa": _flat("piqa", "baber/piqa", None, "validation", ("validation.jsonl",)),
    "sciq": _flat("sciq", "allenai/sciq", None, "test", _TEST_FIRST),
    "winogrande": _flat(
        "winogrande", "allenai/winogrande", "winogrande_xl", "validation", ("validation.jsonl",)
    ),
    "mmlu": _group("mmlu", "cais/mmlu", "test", MMLU_SUBJECTS),
    "cmmlu": _group("cmmlu", "haonan-li/cmmlu", "test", CMMLU_SUBJECTS),
    "ceval": _group("ceval", "ceval/ceval-exam", "val", CEVAL_SUBJECTS),
}
TASKS = _with_subtasks(_TOP_LEVEL)
"""Supported task names → spec: the tasks above, `ceval-valid` (lm-eval's name for `ceval`), and
every subject under lm-eval's subtask name (`mmlu_anatomy`, `cmmlu_agronomy`, `ceval-valid_law`)."""


# ---------------------------------------------------------------- few-shot examples


def _draw_shots(spec: TaskSpec, pool: list[Doc], k: int, doc: Doc, rng: random.Random) -> list[Doc]:
    """lm-eval's few-shot draw for one doc (lm_eval/api/samplers.py), same order and RNG use."""
    if k == 0:
        return []
    if spec.fewshot_sampler == "first_n":
        return pool[:k]
    if not spec.exclude_eval_doc:
        return rng.sample(pool, k)
    shots = [s for s in rng.sample(pool, k + 1) if s != doc][:k]
    if len(shots) < k:  # the pool held copies of the eval doc: draw again without them
        shots = rng.sample([s for s in pool if s != doc], k)
    return shots


# ---------------------------------------------------------------- locating and loading data


def _pick_file(name: str, spec: TaskSpec, folder: Path) -> Path:
    """The first candidate file in lm-eval's own layout, else the first that exists."""
    found = [folder / f for f in spec.local_files if (folder / f).is_file()]
    if not found:
        raise TaskFormatError(
            f"{folder}: no {name} data (looked for {', '.join(spec.local_files)})"
        )
    for path in found:
        first = next(read_records(path), None)
        if first is not None and in_lm_eval_layout(spec.kind, first[1]):
            return path
    return found[0]


def _subject_of(path: Path) -> str:
    for suffix in ("_test", "_val", "_validation", "_dev"):
        if path.stem.endswith(suffix):
            return path.stem[: -len(suffix)]
    return path.stem


def _subject_files(folder: Path) -> dict[str, Path]:
    files = [p for p in sorted(folder.glob("*")) if p.suffix in {".csv", ".jsonl", ".json"}]
    return {_subject_of(p): p for p in files}


def _local_flat(name: str, spec: TaskSpec, path: Path, fewshot: bool) -> list[Subtask]:
    file = _pick_file(name, spec, path) if path.is_dir() else path
    docs, sources = convert_records(spec.kind, read_records(file))
    pool = None
    if fewshot:
        candidates = [file.parent / f"{spec.fewshot_split}{s}" for s in (".jsonl", ".json")]
        pool_file = next((p for p in candidates if p.is_file()), None)
        if pool_file is None:
            raise TaskFormatError(
                f"{name}: few-shot examples come from lm-eval's '{spec.fewshot_split}' split; "
                f"put it at {candidates[0]} or use num_fewshot=0"
            )
        pool = convert_records(spec.kind, read_records(pool_file))[0]
    return [Subtask(name=name, docs=docs, sources=sources, fewshot_docs=pool, description="")]


def _local_subjects(spec: TaskSpec, path: Path, fewshot: bool) -> list[Subtask]:
    """Per-subject files: <path>/<eval_split>/<subject>[_test|_val].csv and <path>/dev/..."""
    if path.is_file():
        files, root = {_subject_of(path): path}, path.parent.parent
    else:
        files, root = _subject_files(path / spec.eval_split), path
    unknown = sorted(set(files) - set(TASKS[spec.kind].subjects))
    if unknown:
        raise TaskFormatError(f"{files[unknown[0]]}: '{unknown[0]}' is not a {spec.kind} subject")
    subjects = [s for s in spec.subjects if s in files]
    if not subjects:
        raise TaskFormatError(f"{path}: no {spec.kind} subject files under {spec.eval_split}/")
    if len(subjects) < len(spec.subjects):
        log.warning("%s: %d of %d subjects present", path, len(subjects), len(spec.subjects))
    dev = _subject_files(root / spec.fewshot_split) if fewshot else {}
    subtasks = []
    for subject in subjects:
        docs, sources = convert_records(spec.kind, read_records(files[subject]))
        pool = None
        if fewshot:
            if subject not in dev:
                raise TaskFormatError(
                    f"{root / spec.fewshot_split}: no few-shot file for {subject}"
                )
            pool = convert_records(spec.kind, read_records(dev[subject]))[0]
        subtasks.append(
            Subtask(
                name=_SUBTASK_PREFIX[spec.kind] + subject,
                docs=docs,
                sources=sources,
                fewshot_docs=pool,
                description=_description(spec.kind, subject),
            )
        )
    return subtasks


def _hf_docs(spec: TaskSpec, config: str | None, split: str) -> tuple[list[Doc], list[str]]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("loading from the Hub needs `datasets` (pip install lmforge[hf])") from e
    rows = datasets.load_dataset(spec.hf_path, config, split=split)
    origin = f"{spec.hf_path}[{config}]:{split}"
    return convert_records(spec.kind, ((f"{origin}:{i}", dict(r)) for i, r in enumerate(rows)))


def _hf_subtasks(name: str, spec: TaskSpec, fewshot: bool) -> list[Subtask]:
    subtasks = []
    for subject in spec.subjects or (None,):
        config = subject or spec.hf_name
        docs, sources = _hf_docs(spec, config, spec.eval_split)
        pool = _hf_docs(spec, config, spec.fewshot_split)[0] if fewshot else None
        subtasks.append(
            Subtask(
                name=name if subject is None else _SUBTASK_PREFIX[spec.kind] + subject,
                docs=docs,
                sources=sources,
                fewshot_docs=pool,
                description="" if subject is None else _description(spec.kind, subject),
            )
        )
    return subtasks


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        known = ", ".join(_TOP_LEVEL)
        raise KeyError(f"unknown task {name!r}; known: {known}, and lm-eval's subtask names")
    return TASKS[name]


def load_docs(name: str, path: str | Path | None = None, *, fewshot: bool = False) -> list[Subtask]:
    """The task's documents in lm-eval's field layout, one Subtask per lm-eval (sub)task.

    path: a data file or a task folder; None loads the Hugging Face dataset lm-eval uses
    (`TaskSpec.hf_path`, needs the network or a populated HF cache). In a folder, a file in
    lm-eval's own layout is preferred over a reformatted one: for arc and openbookqa the shared
    folders' `test.jsonl` is llm-foundry's ICL reformatting (recoverable, but a copy that may
    differ from the HF one, e.g. every ARC question there has exactly 4 choices), so their
    HF-format `validation.jsonl` is read instead. fewshot: also load the few-shot split.
    """
    spec = task_spec(name)
    if path is None:
        return _hf_subtasks(name, spec, fewshot)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder for task {name}")
    if spec.subjects:
        return _local_subjects(spec, path, fewshot)
    return _local_flat(name, spec, path, fewshot)


def load_task(
    name: str,
    path: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    seed: int = 1234,
) -> TaskData:
    """Multiple-choice requests for `name`, formatted as lm-eval v0.4.x formats them.

    num_fewshot: default `TaskSpec.num_fewshot` (5 for mmlu/cmmlu/ceval; lm-eval's own default
    is 0 unless `--num_fewshot 5` is passed). limit: first N docs, like lm-eval's `--limit`,
    which for a group applies to each subject. seed: lm-eval's `fewshot_random_seed` (1234),
    used by tasks that draw few-shot examples at random.
    """
    spec = task_spec(name)
    k = spec.num_fewshot if num_fewshot is None else num_fewshot
    if k < 0 or (limit is not None and limit < 1):
        raise ValueError(f"{name}: num_fewshot={k} must be >= 0 and limit={limit} >= 1")
    requests: list[Request] = []
    for sub in load_docs(name, path, fewshot=k > 0):
        if not sub.docs:
            raise TaskFormatError(f"{sub.name}: no documents to score (path: {path or 'hub'})")
        pool = sub.fewshot_docs or []
        if k and len(pool) < k + spec.exclude_eval_doc:
            raise TaskFormatError(f"{sub.name}: {k} few-shot examples asked, {len(pool)} available")
        rng = random.Random(seed)  # each lm-eval task seeds its own sampler
        count = len(sub.docs) if limit is None else min(limit, len(sub.docs))
        for doc, where in zip(sub.docs[:count], sub.sources[:count], strict=True):
            shots = _draw_shots(spec, pool, k, doc, rng)
            requests.append(build_request(spec.kind, doc, where, shots, sub.description))
    return TaskData(name=name, requests=requests, num_fewshot=k)
