"""Several samples of one prompt (HumanEval's pass@k): N `generate` calls vs `generate_samples`.

Reference model of `train_throughput.py` (random init, seed 0), sampling at temperature 0.8,
top-k 50, top-p 0.95, no stop token, so every sample runs to --new-tokens. For each N, the two
ways take turns for --rounds rounds (the order alternating); the table gives the best round of
each, in seconds and in generated tokens per second.

    python benchmarks/sample_throughput.py                    # N = 1, 4, 10; fp32
    python benchmarks/sample_throughput.py --samples 10 --dtype bf16
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import replace

import torch
from alternating import best_of_alternating_rounds
from decode_throughput import DTYPES, build_models
from train_throughput import REF, THREADS

from lmforge.generate import GenerateConfig, generate, generate_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", default="1,4,10", help="comma-separated N")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--prompt-tokens", type=int, default=150)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    model, hf, _ = build_models(DTYPES[args.dtype])
    del hf
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, REF["vocab_size"], (args.prompt_tokens,), generator=g).tolist()
    cfg = GenerateConfig(max_new_tokens=args.new_tokens, temperature=0.8)

    def one_at_a_time(n: int) -> None:
        for i in range(n):
            generate(model, prompt, replace(cfg, seed=i))

    def batched(n: int) -> None:
        generate_samples(model, prompt, n, cfg)

    ways = {"N generate calls": one_at_a_time, "generate_samples": batched}
    print(
        f"reference model, {args.dtype}, {THREADS} threads; prompt {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens per sample; best of {args.rounds} alternating rounds"
    )
    print("| N | " + " | ".join(ways) + " | speed-up |")
    print("|---:|" + "---:|" * (len(ways) + 1))
    for n in (int(x) for x in args.samples.split(",")):
        runs = {name: functools.partial(way, n) for name, way in ways.items()}
        best = best_of_alternating_rounds(runs, args.rounds)
        tokens = n * args.new_tokens
        cells = [f"{s:.1f} s ({tokens / s:.0f} tok/s)" for s in best.values()]
        speedup = best["N generate calls"] / best["generate_samples"]
        print(f"| {n} | " + " | ".join(cells) + f" | {speedup:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
