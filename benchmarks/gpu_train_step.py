"""Training-step throughput on one GPU: lmforge vs HF transformers, same weights, same batch.

The reference model shape of `train_throughput.py` (vocab 32,000, 6 layers, d_model 512, 8 / 4
heads, d_ff 1,408), rows of `--seq-len` tokens, `--batch` rows per step. One step is what the
trainer does with `precision: auto` on a GPU: bf16 autocast over fp32 weights, the loss
(lmforge: its fused chunked head loss; HF: cross-entropy over fp32 logits), backward, clip,
fused AdamW. Variants:

- lmforge, document masking on: packed documents (exponential lengths, mean `--doc-len`),
  positions restarting per document; `attention: auto` picks compiled flex_attention on CUDA
  above T = 1,024;
- lmforge, plain causal (SDPA is_causal);
- HF `LlamaForCausalLM(attn_implementation="sdpa")`, plain causal, lmforge's initial weights.

With `--compile` each also runs under `torch.compile`. All variants live in one process and take
turns one step at a time; each reports the median of `--steps` timed steps after `--warmup`, MFU
against a bf16 matmul peak measured at the start, and the most memory one of its steps took
above what was allocated before it.

    python benchmarks/gpu_train_step.py --seq-len 2048 --batch 8 --compile
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from train_throughput import REF  # the reference shape, one definition

from lmforge.export import hf_config, hf_state_dict
from lmforge.model.config import ModelConfig
from lmforge.model.llama import Llama
from lmforge.train.config import auto_loss_chunk
from lmforge.train.optim import OptimConfig, build_optimizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, n: int) -> float:
    """bf16 FLOP/s of an n³ product, best of 10 after 3 warm-ups."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for i in range(13):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 3:
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def packed_positions(batch: int, seq_len: int, doc_len: float, seed: int = 0) -> torch.Tensor:
    """Positions of rows packed with documents of exponential length (mean doc_len)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        row: list[int] = []
        while len(row) < seq_len:
            n = max(1, int(torch.empty(1).exponential_(1 / doc_len, generator=gen).item()))
            row += range(min(n, seq_len - len(row)))
        rows.append(row)
    return torch.tensor(rows)


def build(device: torch.device, compiled: bool, args: argparse.Namespace) -> dict[str, Callable]:
    """name -> one training step (returns the loss)."""
    torch.manual_seed(0)
    ours = Llama(ModelConfig(**REF)).to(device)  # type: ignore[arg-type]
    from transformers import LlamaConfig, LlamaForCausalLM

    hcfg = LlamaConfig(**hf_config(ours.cfg))
    hcfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hcfg).to(device)
    hf.load_state_dict(hf_state_dict(ours), strict=True)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, REF["vocab_size"], (args.batch, args.seq_len + 1), generator=gen)
    inputs, labels = ids[:, :-1].to(device), ids[:, 1:].to(device)
    positions = packed_positions(args.batch, args.seq_len, args.doc_len).to(device)
    with torch.no_grad():
        diff = (ours(inputs[:1, :64]) - hf(input_ids=inputs[:1, :64]).logits).abs().max().item()
    print(f"fp32 logits, lmforge vs HF, same weights: max |diff| {diff:.2e}")
    chunk = (
        auto_loss_chunk(REF["vocab_size"], device.type)
        if args.loss_chunk is None
        else args.loss_chunk
    )
    suffix = " compiled" if compiled else ""

    def stepper(model: torch.nn.Module, loss_of: Callable) -> Callable[[], float]:
        opt = build_optimizer(model, OptimConfig())  # fused AdamW, as the trainer
        params = [p for p in model.parameters() if p.requires_grad]

        def step() -> float:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = loss_of()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        return step

    causal = copy.deepcopy(ours)  # each variant trains its own copy with its own optimizer
    doc_fwd = torch.compile(ours) if compiled else ours
    causal_fwd = torch.compile(causal) if compiled else causal
    hf_fwd = torch.compile(hf) if compiled else hf
    n = labels.numel()

    def hf_loss() -> torch.Tensor:
        logits = hf_fwd(input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    steps = {
        f"lmforge doc-masked{suffix}": stepper(
            ours, lambda: doc_fwd(inputs, positions, labels=labels, loss_chunk_tokens=chunk) / n
        ),
        f"lmforge causal{suffix}": stepper(
            causal, lambda: causal_fwd(inputs, None, labels=labels, loss_chunk_tokens=chunk) / n
        ),
        f"HF causal{suffix}": stepper(hf, hf_loss),
    }
    return {k: v for k, v in steps.items() if any(w in k for w in args.variants.split(","))}


def profile(step: Callable[[], float], device: torch.device, rows: int) -> None:
    """The ops of one step (after two warm-ups), most device time first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        step()
        sync(device)
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--doc-len", type=float, default=512.0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also the torch.compile'd variants")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peak-n", type=int, default=8192)
    ap.add_argument("--loss-chunk", type=int, default=None, help="lmforge's loss_chunk_tokens")
    ap.add_argument("--variants", default="lmforge,HF", help="names containing any of these")
    ap.add_argument("--profile", action="store_true", help="an op table per variant instead")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else device.type
    print(f"{name}, torch {torch.__version__}")
    peak = matmul_peak(device, args.peak_n)
    print(f"bf16 matmul peak ({args.peak_n}³): {peak / 1e12:.1f} TFLOP/s")
    steps = build(device, False, args)
    if args.compile:
        steps |= build(device, True, args)
    if args.profile:
        for k, step in steps.items():
            print(f"\n## {k}")
            profile(step, device, 25)
        return
    times: dict[str, list[float]] = {k: [] for k in steps}
    extra: dict[str, int] = dict.fromkeys(steps, 0)
    losses: dict[str, float] = {}
    names = list(steps)
    for round_ in range(args.warmup + args.steps):
        names = names[1:] + names[:1]  # each variant goes first in turn
        for k in names:
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            losses[k] = steps[k]()
            sync(device)
            if round_ >= args.warmup:
                times[k].append(time.perf_counter() - t0)
            if device.type == "cuda":
                extra[k] = max(extra[k], torch.cuda.max_memory_allocated() - before)
    tokens = args.batch * args.seq_len
    flops = ModelConfig(**REF).flops_per_token(args.seq_len) * tokens  # type: ignore[arg-type]
    print(f"\nT = {args.seq_len}, {args.batch} rows ({tokens:,} tokens/step), bf16 autocast")
    print("| variant | step ms (median) | tok/s | MFU | step memory GiB | last loss | / HF |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k in steps:
        dt = statistics.median(times[k])
        hf_key = "HF causal" + (" compiled" if k.endswith("compiled") else "")
        ratio = statistics.median(times[hf_key]) / dt
        print(
            f"| {k} | {dt * 1e3:.1f} | {tokens / dt:,.0f} | {flops / dt / peak:.1%} "
            f"| {extra[k] / 2**30:.2f} | {losses[k]:.4f} | {ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
