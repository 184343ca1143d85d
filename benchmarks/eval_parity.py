"""Full-split accuracy parity and wall time: `lmforge eval --tasks` vs lm-evaluation-harness.

Both score the same checkpoint (ours directly, lm-eval's `hf` model on its HF export) on the same
local data; the accuracies must be equal and the wall times (each including its model load) are
compared side by side. lm-eval reads the data through task YAMLs written here in lm-eval's own
prompt formats: ARC zero-shot, or MMLU subjects 5-shot from their dev splits (the shared CSVs
are converted to JSONL first so `datasets` keeps every choice a string).

    python benchmarks/eval_parity.py --run-dir runs/demo --data-dir ../shared/data/eval
    python benchmarks/eval_parity.py --task mmlu --subjects anatomy,astronomy,virology
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint_dirs import latest_checkpoint
from lmforge.data.tokenizer import TextTokenizer
from lmforge.eval.suite import SuiteConfig, run_suite
from lmforge.pipeline import load_trained

ARC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
validation_split: validation
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

MMLU_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
num_fewshot: 5
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {topic}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choice0}}}}\\nB. {{{{choice1}}}}\\nC. \
{{{{choice2}}}}\\nD. {{{{choice3}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def csv_to_jsonl(src: Path, dst: Path) -> Path:
    with src.open(newline="", encoding="utf-8") as f, dst.open("w", encoding="utf-8") as out:
        for row in csv.DictReader(f):
            out.write(json.dumps({**row, "answer": int(row["answer"])}) + "\n")
    return dst


def lm_eval_tasks(task: str, subjects: list[str], data_dir: str, tmp: Path) -> dict[str, str]:
    """Write lm-eval task YAMLs into tmp; our task name → lm-eval's local task name."""
    data = Path(data_dir).resolve()
    if task != "mmlu":
        name = f"{task}_local"
        path = data / task / "validation.jsonl"
        (tmp / f"{name}.yaml").write_text(ARC_YAML.format(name=name, path=path))
        return {task: name}
    names = {}
    for subject in subjects:
        name = f"mmlu_{subject}_local"
        test = csv_to_jsonl(data / "mmlu" / "test" / f"{subject}_test.csv", tmp / f"{name}.jsonl")
        dev = csv_to_jsonl(data / "mmlu" / "dev" / f"{subject}_dev.csv", tmp / f"{name}_dev.jsonl")
        topic = subject.replace("_", " ")
        yaml = MMLU_YAML.format(name=name, test=test, dev=dev, topic=topic)
        (tmp / f"{name}.yaml").write_text(yaml)
        names[f"mmlu_{subject}"] = name
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="runs/demo", help="a run with checkpoints/ and hf/")
    parser.add_argument("--data-dir", default="../shared/data/eval")
    parser.add_argument("--task", default="arc_easy", choices=["arc_easy", "arc_challenge", "mmlu"])
    parser.add_argument("--subjects", default="anatomy,astronomy,high_school_geography,virology")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval hf model batch size")
    args = parser.parse_args()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    run = Path(args.run_dir)
    checkpoint = latest_checkpoint(run / "checkpoints")
    if checkpoint is None or not (run / "hf").is_dir():
        raise SystemExit(f"{run}: needs checkpoints/ and hf/ (run `lmforge demo` first)")
    shots = 5 if args.task == "mmlu" else 0
    with tempfile.TemporaryDirectory() as tmp:
        tasks = lm_eval_tasks(args.task, args.subjects.split(","), args.data_dir, Path(tmp))
        t0 = time.perf_counter()
        model, recipe = load_trained(checkpoint)
        tokenizer = TextTokenizer.load(run / "tokenizer.json")
        cfg = SuiteConfig(
            tasks=tuple(tasks),
            data_dir=args.data_dir,
            num_fewshot=shots,
            max_length=recipe.packing.seq_len,
        )
        ours = run_suite(model, tokenizer, torch.device("cpu"), cfg)["tasks"]
        ours_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        lm = HFLM(
            pretrained=str(run / "hf"), dtype="float32", batch_size=args.batch_size, device="cpu"
        )
        result = simple_evaluate(
            model=lm,
            tasks=list(tasks.values()),
            task_manager=TaskManager(include_path=tmp),
            num_fewshot=shots,
        )
        theirs_s = time.perf_counter() - t0
    rows: dict[str, Any] = {}
    for ours_name, theirs_name in tasks.items():
        a, b = ours[ours_name], result["results"][theirs_name]
        rows[ours_name] = {
            "n": a["n"],
            "lmforge": [a["acc"], a["acc_norm"]],
            "lm_eval": [b["acc,none"], b["acc_norm,none"]],
            "equal": [a["acc"], a["acc_norm"]] == [b["acc,none"], b["acc_norm,none"]],
        }
    report = {
        "checkpoint": str(checkpoint),
        "num_fewshot": shots,
        "max_length": recipe.packing.seq_len,
        "tasks": rows,
        "all_equal": all(r["equal"] for r in rows.values()),
        "seconds": {"lmforge": round(ours_s, 2), "lm_eval": round(theirs_s, 2)},
        "speedup": round(theirs_s / ours_s, 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
