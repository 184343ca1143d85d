"""Instruction tuning at small scale: does a tiny pretrained model learn the chat template?

Pretrains the demo model (or takes --base, a run dir or checkpoint), instruction-tunes it with
`lmforge sft` on chat samples (by default the shared Alpaca English/Chinese and OASST-zh files),
then compares base and tuned model on the held-out conversations: the loss on assistant tokens,
and for greedy replies to held-out prompts the share that end with <|im_end|> by themselves.

    python benchmarks/sft_demo.py --out runs/sft-demo
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from lmforge import pipeline
from lmforge.data.chat import IM_END, read_chat_records, render, special_id, to_messages
from lmforge.data.sft import SFTLoader, load_sft_data
from lmforge.data.tokenizer import TextTokenizer
from lmforge.eval.perplexity import evaluate_perplexity
from lmforge.generate import GenerateConfig, generate
from lmforge.model.llama import Llama
from lmforge.recipe import load_recipe

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "sft"
DEFAULT_DATA = [
    SHARED / "alpaca_demo_llamafactory" / "alpaca_en_demo.json",
    SHARED / "alpaca_demo_llamafactory" / "alpaca_zh_demo.json",
    SHARED / "oasst1_zh_llamafactory" / "oaast_sft_zh.json",
]


def heldout_loss(model: Llama, data: object, pad_id: int, seq_len: int) -> float:
    rows = SFTLoader(data.heldout, seq_len, 8, pad_id, 1.0, shuffle=False)  # type: ignore[attr-defined]
    return evaluate_perplexity(model, rows, torch.device("cpu"), 1.0)["val_loss"]


def replies(
    model: Llama, tokenizer: TextTokenizer, prompts: list[list[int]], max_new: int
) -> list[list[int]]:
    end = special_id(IM_END)
    cfg = GenerateConfig(temperature=0, max_new_tokens=max_new)
    return [generate(model, p, cfg, stop_ids=(end, tokenizer.eos_id)) for p in prompts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/sft-demo", help="where the runs go")
    parser.add_argument("--base", help="a pretrained run dir or checkpoint (default: pretrain)")
    parser.add_argument("--data", action="append", help="chat data files (repeatable)")
    parser.add_argument("--pretrain-tokens", type=int, default=1_200_000)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--prompts", type=int, default=40, help="held-out prompts to answer")
    parser.add_argument("--max-new", type=int, default=96)
    args = parser.parse_args()
    out = Path(args.out)
    data_files = [str(p) for p in (args.data or DEFAULT_DATA)]
    t0 = time.time()

    base = Path(args.base) if args.base else out / "base"
    if args.base is None and not (base / "checkpoints").is_dir():
        recipe = load_recipe(None, [f"run_dir={base}", f"train.max_tokens={args.pretrain_tokens}"])
        pipeline.train_tokenizer_stage(recipe)
        pipeline.tokenize_stage(recipe)
        pipeline.pretrain_stage(recipe)
    t_base = time.time() - t0

    inst = out / "inst"
    overrides = [
        f"run_dir={inst}",
        f"train.init_from={base}",
        "sft.paths=" + json.dumps(data_files),
        f"sft.epochs={args.epochs}",
        "sft.heldout_fraction=0.05",
        f"packing.seq_len={args.seq_len}",
        f"train.batch_tokens={16 * args.seq_len}",
        "train.micro_batch_size=8",
        f"optim.lr={args.lr}",
        "optim.weight_decay=0.0",
        f"schedule.warmup_tokens={32 * args.seq_len}",
        "train.save_every_steps=1000",
        "eval.every_steps=25",
        "eval.max_batches=20",
    ]
    t1 = time.time()
    records = pipeline.sft_stage(load_recipe(None, overrides))
    t_sft = time.time() - t1

    tokenizer = TextTokenizer.load(inst / "tokenizer.json")
    data = load_sft_data(load_recipe(None, overrides).sft, tokenizer, args.seq_len)
    base_model, _ = pipeline.load_trained(pipeline.initial_checkpoint(str(base)))
    tuned, _ = pipeline.load_trained(pipeline.initial_checkpoint(str(inst)))
    heldout_texts = [
        (where, to_messages(record, where))
        for path in data_files
        for where, record in read_chat_records(path)
    ]
    held = {c.ids.tobytes() for c in data.heldout}
    prompts = []
    for _, turns in heldout_texts:
        ids, _ = render(turns, tokenizer)
        if ids.tobytes() in held or ids[: args.seq_len + 1].tobytes() in held:
            prompt, _ = render(turns[:-1], tokenizer, add_generation_prompt=True)
            if len(prompt) + args.max_new <= args.seq_len:
                prompts.append(prompt.tolist())
    prompts = prompts[: args.prompts]
    end = special_id(IM_END)
    result = {}
    for name, model in (("base", base_model), ("sft", tuned)):
        outs = replies(model, tokenizer, prompts, args.max_new)
        result[name] = {
            "heldout_assistant_loss": heldout_loss(model, data, tokenizer.pad_id, args.seq_len),
            "replies_ending_with_im_end": sum(o[-1:] == [end] for o in outs) / len(outs),
            "mean_reply_tokens": sum(len(o) for o in outs) / len(outs),
            "samples": [
                {"prompt": tokenizer.decode(p[-60:]), "reply": tokenizer.decode(o)}
                for p, o in itertools.islice(zip(prompts, outs, strict=True), 3)
            ],
        }
    evals = [(r["step"], round(r["val_loss"], 4)) for r in records if "val_loss" in r]
    summary = {
        "data": data.counts,
        "prompts": len(prompts),
        "held_out_loss_during_sft": evals,
        "seconds": {"pretrain": round(t_base), "sft": round(t_sft)},
        "sft_tokens": records[-1]["tokens"],
        **result,
    }
    (out / "sft_demo.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print(f"\n| model | held-out assistant loss | replies ending with {IM_END} | reply tokens |")
    print("|---|---:|---:|---:|")
    for name in ("base", "sft"):
        r = result[name]
        print(
            f"| {name} | {r['heldout_assistant_loss']:.3f} | "
            f"{r['replies_ending_with_im_end']:.0%} | {r['mean_reply_tokens']:.1f} |"
        )
    print(f"\nheld-out loss during SFT (step, loss): {evals}")
    print(f"data: {json.dumps(data.counts)}; {len(prompts)} prompts; seconds {summary['seconds']}")
    for s in result["sft"]["samples"]:
        print(f"\n--- ...{s['prompt']!r}\n>>> {s['reply']!r}")


if __name__ == "__main__":
    main()
