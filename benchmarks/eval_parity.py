"""Full-split accuracy parity and wall time: `lmforge eval --tasks` vs lm-evaluation-harness.

Both score the same checkpoint (ours directly, lm-eval's `hf` model on its HF export) on the same
local data, zero-shot; the accuracies must be equal and the wall times are compared side by side.
lm-eval reads the data through a task YAML written here with lm-eval's own ARC prompt format.

    python benchmarks/eval_parity.py --run-dir runs/demo --data-dir ../shared/data/eval
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lmforge.checkpoint import latest_checkpoint
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="runs/demo", help="a run with checkpoints/ and hf/")
    parser.add_argument("--data-dir", default="../shared/data/eval")
    parser.add_argument("--task", default="arc_easy", choices=["arc_easy", "arc_challenge"])
    args = parser.parse_args()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    run = Path(args.run_dir)
    checkpoint = latest_checkpoint(run / "checkpoints")
    if checkpoint is None or not (run / "hf").is_dir():
        raise SystemExit(f"{run}: needs checkpoints/ and hf/ (run `lmforge demo` first)")
    model, recipe = load_trained(checkpoint)
    tokenizer = TextTokenizer.load(run / "tokenizer.json")
    cfg = SuiteConfig(tasks=(args.task,), data_dir=args.data_dir, max_length=recipe.packing.seq_len)
    t0 = time.perf_counter()
    ours = run_suite(model, tokenizer, torch.device("cpu"), cfg)["tasks"][args.task]
    ours_s = time.perf_counter() - t0

    data = (Path(args.data_dir) / args.task / "validation.jsonl").resolve()
    with tempfile.TemporaryDirectory() as tmp:
        name = f"{args.task}_local"
        (Path(tmp) / f"{name}.yaml").write_text(ARC_YAML.format(name=name, path=data))
        t0 = time.perf_counter()  # lm-eval's wall time includes its model load and task build
        lm = HFLM(pretrained=str(run / "hf"), dtype="float32", batch_size=16, device="cpu")
        result = simple_evaluate(
            model=lm, tasks=[name], task_manager=TaskManager(include_path=tmp), num_fewshot=0
        )
        theirs_s = time.perf_counter() - t0
    theirs = result["results"][name]
    report = {
        "task": args.task,
        "n": ours["n"],
        "lmforge": {"acc": ours["acc"], "acc_norm": ours["acc_norm"], "seconds": ours_s},
        "lm_eval": {
            "acc": theirs["acc,none"],
            "acc_norm": theirs["acc_norm,none"],
            "seconds": theirs_s,
        },
        "equal": ours["acc"] == theirs["acc,none"] and ours["acc_norm"] == theirs["acc_norm,none"],
        "speedup": theirs_s / ours_s,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
