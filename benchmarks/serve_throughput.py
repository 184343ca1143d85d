"""Concurrent requests, arriving over time: one at a time vs continuous batching vs HF's.

What `lmforge serve` does with several clients. Reference model of `train_throughput.py`
(random init, seed 0), greedy, no stop token, so every request runs to --new-tokens. --requests
prompts of random lengths between --min-prompt and --max-prompt tokens arrive as a Poisson
process of --rate requests per second (0: all at once). A dispatcher admits them in arrival
order while fewer than --concurrency are in flight (serve's `max_concurrency`):

- "one at a time": lmforge `generate` per request, in arrival order (serve before continuous
  batching, and serve with `--max-concurrency 1`);
- "lmforge batcher": `ContinuousBatcher`, what serve runs: a request joins the running batch at
  its next step and leaves when done;
- "HF continuous batching": transformers' `ContinuousBatchingManager` (paged KV cache, requests
  added while it runs) on the same weights, capacity for every admitted request.

With --compile, also "lmforge batcher, compiled": the batcher with serve's `generate.compile`.
Each way's outputs are compared with "one at a time" (fp32: equal ids expected). After one
warm-up round each (where compiling happens), the ways take turns for --rounds rounds (order
alternating); the table gives each way's round with the
shortest makespan (first arrival to last token): generated tokens per second over the makespan,
and the latency of a request (its arrival to its last token), mean and 90th percentile.

    python benchmarks/serve_throughput.py                  # 16 requests, 2 per second
    python benchmarks/serve_throughput.py --rate 0         # a burst
    python benchmarks/serve_throughput.py --compile        # and serve with generate.compile
    python benchmarks/serve_throughput.py --requests 4 --new-tokens 8 --rounds 1   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from decode_throughput import build_models
from train_throughput import REF, THREADS

from lmforge.batching import ContinuousBatcher
from lmforge.generate import GenerateConfig, generate_stream

Handle = Callable[[list[int]], tuple[list[int], float | None]]
"""Serve one prompt: its generated ids, and the longest wait between two of its tokens where
they are streamed (blocking; called from one thread per request)."""


@dataclass
class Run:
    outputs: list[list[int]]
    latencies: list[float]
    gaps: list[float | None]
    makespan: float


def streamed(tokens: Iterable[int]) -> tuple[list[int], float]:
    """The ids, and the longest wait between two consecutive ones."""
    ids: list[int] = []
    gap, last = 0.0, None
    for token in tokens:
        now = time.perf_counter()
        gap = max(gap, now - last) if last is not None else gap
        last = now
        ids.append(token)
    return ids, gap


def drive(prompts: list[list[int]], arrivals: list[float], handle: Handle, concurrency: int) -> Run:
    """Release each prompt at its arrival time, in order, once fewer than `concurrency` are in
    flight; each in-flight request runs `handle` on a thread of its own."""
    outputs: list[list[int]] = [[] for _ in prompts]
    gaps: list[float | None] = [None] * len(prompts)
    ends = [0.0] * len(prompts)
    slots = threading.Semaphore(concurrency)

    def serve(i: int) -> None:
        try:
            outputs[i], gaps[i] = handle(prompts[i])
            ends[i] = time.perf_counter()
        finally:
            slots.release()

    t0 = time.perf_counter()
    workers = []
    for i, arrival in enumerate(arrivals):
        time.sleep(max(0.0, t0 + arrival - time.perf_counter()))
        slots.acquire()
        workers.append(threading.Thread(target=serve, args=(i,)))
        workers[-1].start()
    for w in workers:
        w.join()
    latencies = [end - (t0 + a) for end, a in zip(ends, arrivals, strict=True)]
    return Run(outputs, latencies, gaps, max(ends) - t0)


@contextmanager
def hf_manager(hf: Any, new_tokens: int, capacity: int) -> Iterator[Handle]:
    """HF's continuous batching manager, running, as a Handle; one collector thread hands each
    finished result to the request waiting for it."""
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    gen = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, eos_token_id=-1, pad_token_id=0
    )
    page = 256
    cb = ContinuousBatchingConfig(
        num_blocks=-(-capacity // page) + 8,
        page_size=page,
        max_batch_tokens=1024,
        allow_block_sharing=False,  # random prompts share no prefix; keep the work the same
    )
    manager = hf.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    manager.start()
    done: dict[str, list[int]] = {}
    arrived = threading.Condition()
    running = True

    def collect() -> None:
        while running:
            result = manager.get_result(timeout=0.05)
            if result is not None and result.is_finished():
                if result.error:
                    raise RuntimeError(f"HF request {result.request_id}: {result.error}")
                with arrived:
                    done[result.request_id] = list(result.generated_tokens)
                    arrived.notify_all()

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    count = iter(range(1_000_000))

    def handle(prompt: list[int]) -> list[int]:
        rid = manager.add_request(prompt, request_id=f"r{next(count)}", max_new_tokens=new_tokens)
        with arrived:
            arrived.wait_for(lambda: rid in done)
            return done.pop(rid), None  # not streamed

    try:
        yield handle
    finally:
        running = False
        collector.join()
        manager.stop(block=True, timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--rate", type=float, default=2.0, help="arrivals per second; 0: all at once")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    ap.add_argument("--min-prompt", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--prefill-chunks",
        default="256",
        help="comma-separated prefill_chunk of each lmforge batcher to run (0: whole prompts)",
    )
    ap.add_argument("--no-hf", action="store_true", help="leave HF's continuous batching out")
    ap.add_argument(
        "--compile", action="store_true", help="also a compiled lmforge batcher (serve's compile)"
    )
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    model, hf, _ = build_models(torch.float32)
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (args.requests,), generator=g)
    vocab = REF["vocab_size"]
    prompts = [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in lengths]
    gaps = torch.empty(args.requests).exponential_(generator=g) / args.rate if args.rate else None
    arrivals = [0.0] * args.requests if gaps is None else (gaps.cumsum(0) - gaps[0]).tolist()
    cfg = GenerateConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    tokens = args.requests * args.new_tokens
    ways: dict[str, tuple[Handle, int]] = {
        "one at a time": (lambda p: streamed(generate_stream(model, p, cfg)), 1),
    }
    batchers = {}
    chunks = [int(c) for c in args.prefill_chunks.split(",")]
    for chunk, compiled in [(c, False) for c in chunks] + [(chunks[0], True)] * args.compile:
        name = "lmforge batcher"
        if len(chunks) > 1:
            name += f", chunk {chunk}" if chunk else ", whole prompts"
        name += ", compiled" if compiled else ""
        batcher = ContinuousBatcher(model, compile=compiled, prefill_chunk=chunk or 1 << 30)
        batchers[name] = batcher
        ways[name] = (
            lambda p, b=batcher: streamed(b.submit(p, cfg).tokens()),  # type: ignore[misc]
            args.concurrency,
        )
    with with_hf(hf, args, ways) as ways:
        print(
            f"reference model, fp32, {THREADS} threads; {args.requests} requests, prompts of "
            f"{args.min_prompt}-{args.max_prompt} tokens ({sum(lengths.tolist())} in all), "
            f"{args.new_tokens} new tokens each, greedy; arrivals "
            + (f"Poisson at {args.rate}/s over {arrivals[-1]:.1f} s" if args.rate else "at once")
            + f"; at most {args.concurrency} in flight; best of {args.rounds} alternating rounds"
        )
        for handle, concurrency in ways.values():  # warm-up (and compiles): a round each
            drive(prompts, [0.0] * len(prompts), handle, concurrency)
        best: dict[str, Run] = {}
        for r in range(args.rounds):
            for name in list(ways)[:: 1 if r % 2 == 0 else -1]:
                handle, concurrency = ways[name]
                run = drive(prompts, arrivals, handle, concurrency)
                if name not in best or run.makespan < best[name].makespan:
                    best[name] = run
        reference = best["one at a time"].outputs
        for name, run in best.items():
            same = sum(a == b for a, b in zip(run.outputs, reference, strict=True))
            print(f"{name}: {same}/{args.requests} requests identical to one at a time")
        print(
            "| way | makespan s | tok/s | latency mean s | latency p90 s | longest gap s "
            "| / one at a time |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        base = best["one at a time"].makespan
        for name, run in best.items():
            p90 = statistics.quantiles(run.latencies, n=10)[-1]
            streams = [g for g in run.gaps if g is not None]
            gap = f"{max(streams):.2f}" if streams else "—"
            print(
                f"| {name} | {run.makespan:.1f} | {tokens / run.makespan:.0f} | "
                f"{statistics.mean(run.latencies):.1f} | {p90:.1f} | {gap} | "
                f"{base / run.makespan:.2f}x |"
            )
        for name, batcher in batchers.items():
            print(f"{name}: widest batch {batcher.widest} rows, {batcher.steps} steps")
            batcher.close()


@contextmanager
def with_hf(
    hf: Any, args: argparse.Namespace, ways: dict[str, tuple[Handle, int]]
) -> Iterator[dict[str, tuple[Handle, int]]]:
    """`ways`, with HF's continuous batching added unless --no-hf."""
    if args.no_hf:
        yield ways
        return
    capacity = args.concurrency * (args.max_prompt + args.new_tokens)
    with torch.inference_mode(), hf_manager(hf, args.new_tokens, capacity) as handle:
        yield {**ways, "HF continuous batching": (handle, args.concurrency)}


if __name__ == "__main__":
    main()
