"""Different prompts as one batch: B `generate` calls vs `generate_batch` vs HF `generate`.

What `lmforge generate` with several prompts, lm-eval's `generate_until` (`--batch_size`) and
greedy HumanEval do. Reference model of `train_throughput.py` (random init, seed 0), greedy, no
stop token, so every row runs to --new-tokens. B prompts of random lengths between
--min-prompt and --max-prompt tokens:

- "B generate calls": lmforge's `generate`, one prompt after the other;
- "generate_batch": lmforge, the prompts left-padded to the longest and decoded as one batch;
- "HF batch": HF `LlamaForCausalLM.generate` on the same weights, left-padded with an attention
  mask (HF's way to batch prompts of different lengths), greedy, exactly --new-tokens.

Before timing, each row of `generate_batch` is compared with its `generate` call, and HF's rows
with lmforge's (fp32: equal ids expected; bf16 can part at a near-tie). For each B, the ways take
turns for --rounds rounds (the order alternating); the table gives the best round of each in
seconds and generated tokens per second (B x new tokens / time, prefill included).

    python benchmarks/batch_throughput.py                     # B = 1, 4, 8, 16; fp32
    python benchmarks/batch_throughput.py --batches 2 --new-tokens 8 --rounds 1   # smoke test
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch
from alternating import best_of_alternating_rounds
from decode_throughput import DTYPES, build_models
from train_throughput import REF, THREADS

from lmforge.generate import GenerateConfig, generate, generate_batch


def hf_batch(hf: object, prompts: list[list[int]], n: int) -> list[list[int]]:
    """HF greedy generate of left-padded prompts, exactly n new ids per row."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(  # type: ignore[attr-defined]
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[:, longest:].tolist()


def first_difference(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for x, y in zip(a, b, strict=True))
    return f"{same}/{len(a)} rows identical"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,4,8,16", help="comma-separated B")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--min-prompt", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    model, hf, _ = build_models(DTYPES[args.dtype])
    cfg = GenerateConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    g = torch.Generator().manual_seed(5)
    sizes = [int(x) for x in args.batches.split(",")]
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (max(sizes),), generator=g)
    all_prompts = [
        torch.randint(0, REF["vocab_size"], (int(n),), generator=g).tolist() for n in lengths
    ]

    ways: dict[str, Callable[[list[list[int]]], list[list[int]]]] = {
        "B generate calls": lambda ps: [generate(model, p, cfg) for p in ps],
        "generate_batch": lambda ps: generate_batch(model, ps, cfg),
        "HF batch": lambda ps: hf_batch(hf, ps, args.new_tokens),
    }
    print(
        f"reference model, {args.dtype}, {THREADS} threads; prompts of "
        f"{args.min_prompt}-{args.max_prompt} tokens, {args.new_tokens} new tokens each, greedy; "
        f"best of {args.rounds} alternating rounds"
    )
    with torch.inference_mode():
        for b in sizes:
            prompts = all_prompts[:b]
            out = {name: way(prompts) for name, way in ways.items()}  # also the warm-up
            calls = out["B generate calls"]
            print(
                f"B={b}: generate_batch vs generate calls: "
                f"{first_difference(out['generate_batch'], calls)}; "
                f"HF vs generate calls: {first_difference(out['HF batch'], calls)}"
            )
        print("| B | prompt tokens | " + " | ".join(ways) + " | batch / calls | batch / HF |")
        print("|---:|---:|" + "---:|" * (len(ways) + 2))
        for b in sizes:
            prompts = all_prompts[:b]
            runs = {name: functools.partial(way, prompts) for name, way in ways.items()}
            best = best_of_alternating_rounds(runs, args.rounds)
            tokens = b * args.new_tokens
            cells = [f"{s:.1f} s ({tokens / s:.0f} tok/s)" for s in best.values()]
            calls = best["B generate calls"] / best["generate_batch"]
            vs_hf = best["HF batch"] / best["generate_batch"]
            print(
                f"| {b} | {sum(map(len, prompts))} | "
                + " | ".join(cells)
                + f" | {calls:.2f}x | {vs_hf:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
