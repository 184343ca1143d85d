"""Long context in linear memory: document-masked attention and a whole training step vs T.

    python benchmarks/long_context.py attention            # kernels side by side at T=8192
    python benchmarks/long_context.py step                 # tiny model, T = 1K ... 32K

`attention`: forward + backward of GQA attention (8 query / 4 KV heads, head_dim 64) over one
packed row, for several document-length patterns: the dense boolean mask, a loop of causal
SDPA calls over `torch.split` pieces (the reference to beat), lmforge's split kernel, and the
ideal (the same documents unpacked, those of equal length as one contiguous batch: Σ doc_len²
work in the fewest calls). Medians of interleaved repeats in one process.

`step`: one training step (forward, chunked cross-entropy, backward, AdamW) of a tiny model on
one row of T tokens, with 512-token documents and with one document, each in a fresh process so
its peak RSS is its own. Memory should grow linearly in T.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

H, HKV, D = 8, 4, 64


def doc_lengths(pattern: str, T: int) -> list[int]:
    """'512' (equal documents), 'one' (a single document), 'mixed:lo-hi' (uniform lengths)."""
    if pattern == "one":
        return [T]
    if pattern.startswith("mixed:"):
        lo, hi = (int(x) for x in pattern.split(":")[1].split("-"))
        rng, lengths = random.Random(0), []
        while sum(lengths) < T:
            lengths.append(rng.randint(lo, hi))
        lengths[-1] -= sum(lengths) - T
        return lengths
    return [int(pattern)] * (T // int(pattern))


def attention_kernels(lengths: list[int]) -> dict[str, Callable[[], None]]:
    from lmforge.model.attention import document_mask, plan_document_mask, split_attention

    T = sum(lengths)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    q = torch.randn(1, H, T, D, requires_grad=True)
    k = torch.randn(1, HKV, T, D, requires_grad=True)
    v = torch.randn(1, HKV, T, D, requires_grad=True)
    alone = [[torch.randn(1, h, n, D, requires_grad=True) for h in (H, HKV, HKV)] for n in lengths]

    def sdpa(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)

    def dense() -> None:
        mask = document_mask(pos)
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).sum().backward()

    def loop() -> None:
        parts = zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True)
        torch.cat([sdpa(a, b, c) for a, b, c in parts], 2).sum().backward()

    def split() -> None:  # as the model dispatches: one document per row is plain causal
        plan = plan_document_mask(pos, "split")
        out = sdpa(q, k, v) if plan.causal else split_attention(q, k, v, plan)
        out.sum().backward()

    def ideal() -> None:
        torch.stack([sdpa(a, b, c).sum() for a, b, c in alone]).sum().backward()

    kernels = {"loop": loop, "split": split, "ideal": ideal}
    return ({"dense": dense} if T <= 8192 else {}) | kernels


def bench_attention(T: int, repeats: int) -> None:
    patterns = ["512", "mixed:16-1024", "32", "mixed:8-128", "one"]
    print(f"attention forward+backward, T={T}, {H}/{HKV} heads, head_dim {D}, median s")
    header = "| documents | dense | loop (reference) | lmforge split | ideal | split/ideal |"
    print(header + " split/loop |")
    print("|---|---|---|---|---|---|---|")
    for pattern in patterns:
        lengths = doc_lengths(pattern, T)
        kernels = attention_kernels(lengths)
        times: dict[str, list[float]] = {name: [] for name in kernels}
        for fn in kernels.values():  # warm up
            fn()
        for _ in range(repeats):
            for name, fn in kernels.items():
                if name == "dense" and len(times["dense"]) >= 2:
                    continue  # seconds per call: two samples suffice
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
        cells = [f"{med[n]:.3f}" if n in med else "-" for n in ("dense", "loop", "split", "ideal")]
        label = f"{pattern} ({len(lengths)} docs)"
        ratios = f"{med['split'] / med['ideal']:.2f} | {med['split'] / med['loop']:.2f}"
        print(f"| {label} | " + " | ".join(cells) + f" | {ratios} |")


def one_step(T: int, pattern: str, vocab: int, chunk: int) -> dict[str, float]:
    """Runs in its own process: peak RSS growth over a few training steps at this T."""
    from lmforge.model.config import ModelConfig
    from lmforge.model.llama import Llama

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, num_layers=2, d_model=256, num_heads=4, num_kv_heads=2)
    model = Llama(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lengths = doc_lengths(pattern, T)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.randint(0, vocab, (1, T))
    labels = ids.roll(-1, 1)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model(ids, positions, labels=labels, loss_chunk_tokens=chunk).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"seconds": sorted(times)[1], "peak_mb": peak_mb}


def bench_steps(lengths: list[int], vocab: int, chunk: int) -> None:
    print(
        f"training step, 2 layers d=256, vocab {vocab}, one row of T tokens,"
        f" loss_chunk_tokens={chunk}; peak RSS growth in a fresh process"
    )
    print("| T | documents | step s | tokens/s | peak MB | peak MB per 1K tokens |")
    print("|---|---|---|---|---|---|")
    for T in lengths:
        for pattern in ("512", "one"):
            cmd = [sys.executable, __file__, "_one", str(T), pattern, str(vocab), str(chunk)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"| {T} | {pattern} | failed: {done.stderr.strip().splitlines()[-1]} |")
                continue
            r = json.loads(done.stdout)
            print(
                f"| {T} | {pattern} | {r['seconds']:.2f} | {T / r['seconds']:,.0f} |"
                f" {r['peak_mb']:.0f} | {r['peak_mb'] / (T / 1024):.1f} |"
            )


def main() -> None:
    if sys.argv[1:2] == ["_one"]:
        T, pattern, vocab, chunk = sys.argv[2:6]
        print(json.dumps(one_step(int(T), pattern, int(vocab), int(chunk))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["attention", "step"])
    parser.add_argument("--T", type=int, default=8192, help="attention: tokens in the row")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--loss-chunk", type=int, help="default: the trainer's automatic size")
    args = parser.parse_args()
    if args.what == "attention":
        bench_attention(args.T, args.repeats)
    else:
        from lmforge.train.config import auto_loss_chunk

        chunk = (
            args.loss_chunk if args.loss_chunk is not None else auto_loss_chunk(args.vocab, "cpu")
        )
        bench_steps([int(x) for x in args.lengths.split(",")], args.vocab, chunk)


if __name__ == "__main__":
    main()
