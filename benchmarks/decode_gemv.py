"""Weight-read speed of one decode token's matrix products, per path, on the reference shapes.

Batch-1 decode multiplies one activation vector by every weight matrix, so each product's cost
is reading its weights: GB/s = weight bytes / time. For each (out, in) shape of the reference
model (train_throughput.REF: the head 32000x512, SwiGLU 1408x512 and 512x1408, attention 512x512
and 256x512) this times, medians over --repeats calls after warm-up:

- `F.linear(x, W)` with x (1, in): what nn.Linear does (sgemm with M = 1 on CPU);
- `torch.mv(W, x)`: the matrix-vector path of lmforge.model.linear.Linear;
- the same two with bf16 weights and input, and F.linear at batch 8 (batched decode).

A matrix of a few MB stays in cache between repeats here, so the small shapes read faster than
they do inside a decode step, where every layer's weights come from memory; the head (65.5 MB
in fp32) does not fit and shows the memory-bound rate. Then one whole decode step of the
reference model with a 128-token KV cache, timed, and its top operators from torch.profiler.

    python benchmarks/decode_gemv.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from train_throughput import REF

SHAPES = [(32_000, 512), (1408, 512), (512, 1408), (512, 512), (256, 512)]


def median_s(repeats: int, fn: Callable[..., object], *args: object) -> float:
    for _ in range(10):
        fn(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemv_table(repeats: int) -> None:
    print(
        "| shape (out x in) | MB fp32 | F.linear GB/s | torch.mv GB/s | bf16 F.linear | bf16 mv "
        "| F.linear batch 8 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for out, inp in SHAPES:
        w, x, x8 = torch.randn(out, inp), torch.randn(1, inp), torch.randn(8, inp)
        wb, xb = w.bfloat16(), x.bfloat16()
        fp32, bf16 = w.numel() * 4, w.numel() * 2
        cells = [
            fp32 / median_s(repeats, F.linear, x, w),
            fp32 / median_s(repeats, torch.mv, w, x[0]),
            bf16 / median_s(repeats, F.linear, xb, wb),
            bf16 / median_s(repeats, torch.mv, wb, xb[0]),
            fp32 / median_s(repeats, F.linear, x8, w),
        ]
        print(
            f"| {out} x {inp} | {fp32 / 1e6:.1f} | "
            + " | ".join(f"{c / 1e9:.1f}" for c in cells)
            + " |"
        )


def decode_step(repeats: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    from lmforge.model.attention import KVCache
    from lmforge.model.config import ModelConfig
    from lmforge.model.llama import Llama

    cfg = ModelConfig(**REF)
    model = Llama(cfg).eval()
    cache = KVCache(cfg, 1, 256, "cpu", torch.float32)
    model.hidden_states(torch.randint(0, cfg.vocab_size, (1, 128)), cache=cache)
    token = torch.tensor([[5]])

    def step() -> torch.Tensor:
        hidden = model.hidden_states(token, cache=cache)
        cache.length -= 1  # the same position every time
        return model.lm_head(hidden[:, -1]).argmax(-1)

    s = median_s(repeats, step)
    print(f"\ndecode step, batch 1, 128 cached tokens: {s * 1e3:.2f} ms = {1 / s:.1f} tok/s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(50):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    with torch.inference_mode():
        gemv_table(args.repeats)
        decode_step(args.repeats // 2)


if __name__ == "__main__":
    main()
