"""Autoregressive decode speed: lmforge's generation vs HF transformers `generate`, same weights.

Reference config (the one of train_throughput.py): vocab 32000, 6 layers, d_model 512, 8 heads /
4 KV heads, SwiGLU d_ff 1408, untied head, random init (seed 0). The HF `LlamaForCausalLM`
(attn_implementation="sdpa", its default DynamicCache) gets lmforge's weights through
`lmforge.export.hf_state_dict`; fp32 logits of both are compared once, then both models are cast
to the precision under test (bf16: the weights themselves, not autocast).

Both decode greedily a fixed number of new tokens after a random prompt, with no stop token:

- batch 1, lmforge: `lmforge.generate.generate_stream` at temperature 0 (the iterator that
  `generate` drains), so the first token's time can be read off;
- batch > 1, lmforge: `lmforge.generate.generate_batch` at temperature 0, its `finished`
  callback noting when the first new token arrives (the prompts are of equal length here:
  batch_throughput.py times prompts of different lengths);
- `--compile`: also "lmforge compiled" (batch 1, `generate_stream`) and "lmforge batch
  compiled" (`generate_batch`) with `generate.compile` (the decode step under torch.compile;
  the first, compiling generation is timed apart);
- HF: `model.generate(do_sample=False, min_new_tokens=max_new_tokens=N, eos_token_id=None)`,
  all prompts of equal length (no padding), with a streamer that only notes when the first new
  token arrives (HF hands it every token anyway; the cost is one call per step);
- batch 1, litgpt (when installed; see train_throughput.py for the install): its GPT with
  lmforge's weights, a KV cache set for each generation (`set_kv_cache`) and
  `litgpt.generate.base.generate_fn` at temperature 0 and top-p 0 (litgpt's greedy), the
  iterator its `generate` drains.

Before timing, the greedy ids of both at batch 1 are compared (bf16 can part at a near-tie; the
first differing step and both models' logit gaps there are printed). Then, for each batch size,
one untimed warm-up generation each and --rounds timed rounds in which the two take turns
(the order rotating each round), all in this one process under `torch.inference_mode()`.

Per run: prefill = time to the first new token (the prompt's forward pass and its argmax); decode
tok/s = (N - 1) / (total - prefill) per sequence, times the batch size for a batch's throughput.
The table shows medians over the rounds. Bound: decoding one token reads every weight except the
embedding table once (the embedding is a one-row gather), so at batch 1 the speed can't pass
memory bandwidth / those bytes. The bandwidth is measured here (best of several ~256 MB tensor
copies, bytes read + written / time). A batch of B shares one read of the weights, so its rows are
compared against B x the batch-1 bound (a loose bound: at larger B decode leans toward compute).
The KV cache read per step is small at these lengths and is left out of the bound (printed).

    python benchmarks/decode_throughput.py                       # fp32 + bf16, batch 1 and 8
    python benchmarks/decode_throughput.py --dtype bf16 --threads 2 --out decode.json
    python benchmarks/decode_throughput.py --dtype both --threads 2 --compile
    python benchmarks/decode_throughput.py --dtype fp32 --new-tokens 8 --prompt-tokens 16 \\
        --rounds 2 --batch-sizes 1,2                             # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from cpu_meter import CpuMeter
from train_throughput import REF, build_litgpt, litgpt_installed

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEED = 0


@dataclass
class Run:
    """One timed generation: seconds to the first new token and in all, and the new ids (B, N)."""

    prefill_s: float
    total_s: float
    tokens: torch.Tensor

    def decode_tok_s(self) -> float:
        """Decode tokens/s of one sequence after the first token; nan when N == 1."""
        n = self.tokens.shape[1]
        return (n - 1) / (self.total_s - self.prefill_s) if n > 1 else float("nan")


@dataclass
class Series:
    """The timed rounds of one implementation at one precision and batch size."""

    impl: str
    dtype: str
    batch: int
    runs: list[Run] = field(default_factory=list)

    @property
    def prefill_ms(self) -> float:
        return 1e3 * statistics.median(r.prefill_s for r in self.runs)

    @property
    def decode_tok_s(self) -> float:
        """Median over rounds of the batch's decode throughput (per-sequence rate x batch)."""
        return self.batch * statistics.median(r.decode_tok_s() for r in self.runs)


# ---------------------------------------------------------------------------------------------
# machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def measure_bandwidth(megabytes: int = 256, repeats: int = 8) -> float:
    """Memory bandwidth in bytes/s: best of `repeats` copies of a `megabytes` fp32 tensor, bytes
    read + written per copy over its time (torch's copy uses all its threads)."""
    src = torch.rand(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page before timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


# ---------------------------------------------------------------------------------------------
# models


def build_models(dtype: torch.dtype) -> tuple[Any, Any, float]:
    """lmforge's Llama (seeded init) and an HF LlamaForCausalLM with its weights, both in eval
    mode and cast to dtype; also the fp32 max |logit difference| of the two before the cast."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.export import hf_config, hf_state_dict
    from lmforge.model.config import ModelConfig
    from lmforge.model.llama import Llama

    torch.manual_seed(SEED)
    ours = Llama(ModelConfig(**REF)).eval()  # type: ignore[arg-type]
    hcfg = LlamaConfig(**hf_config(ours.cfg))
    hcfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hcfg).eval()
    hf.load_state_dict(hf_state_dict(ours), strict=True)
    x = torch.randint(0, REF["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (ours(x) - hf(input_ids=x, use_cache=False).logits).abs().max().item()
    return ours.to(dtype), hf.to(dtype), diff


def weight_bytes_per_token(model: Any) -> int:
    """Bytes of weights one decode step reads: all but the embedding table (a one-row gather);
    a tied head reads the embedding as its weight."""
    cfg = model.cfg
    n = cfg.num_params(embeddings=False) + (
        cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    )
    return n * next(model.parameters()).element_size()


def kv_bytes_at(model: Any, length: int) -> int:
    """Bytes of keys and values one decode step reads with `length` tokens cached, per sequence."""
    cfg = model.cfg
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
    return per_token * length * next(model.parameters()).element_size()


# ---------------------------------------------------------------------------------------------
# the three ways to decode


def lmforge_generate(model: Any, prompts: torch.Tensor, n: int, compile: bool = False) -> Run:
    """lmforge's generate path (batch 1): `generate_stream`, greedy, no stop ids; compile: its
    torch.compile'd decode step (`generate.compile`)."""
    from lmforge.generate import GenerateConfig, generate_stream

    if prompts.shape[0] != 1:
        raise ValueError("lmforge generate decodes one prompt at a time")
    cfg = GenerateConfig(max_new_tokens=n, temperature=0.0, top_k=None, top_p=None, compile=compile)
    t0 = time.perf_counter()
    stream = generate_stream(model, prompts[0].tolist(), cfg)
    out = [next(stream)]
    t1 = time.perf_counter()
    out.extend(stream)
    t2 = time.perf_counter()
    return Run(t1 - t0, t2 - t0, torch.tensor([out]))


def lmforge_batch(model: Any, prompts: torch.Tensor, n: int, compile: bool = False) -> Run:
    """lmforge's batched generate path: `generate_batch`, greedy, no stop ids; compile: its
    torch.compile'd decode step."""
    from lmforge.generate import GenerateConfig, generate_batch

    cfg = GenerateConfig(max_new_tokens=n, temperature=0.0, top_k=None, top_p=None, compile=compile)
    first: list[float] = []

    def clock(row: int, new: list[int]) -> bool:
        if not first:
            first.append(time.perf_counter())
        return False

    t0 = time.perf_counter()
    out = generate_batch(model, prompts.tolist(), cfg, finished=clock)
    t2 = time.perf_counter()
    return Run(first[0] - t0, t2 - t0, torch.tensor(out))


class FirstTokenClock:
    """An HF streamer that only notes when the first new token arrives (its first `put` is the
    prompt, the second the first generated token)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def hf_generate(hf: Any, prompts: torch.Tensor, n: int) -> Run:
    """HF `generate`, greedy, exactly n new tokens (no EOS), equal-length prompts."""
    clock = FirstTokenClock()
    t0 = time.perf_counter()
    out = hf.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        eos_token_id=None,
        pad_token_id=None,
        streamer=clock,
    )
    t2 = time.perf_counter()
    tokens = out[:, prompts.shape[1] :]
    if tokens.shape != (prompts.shape[0], n) or clock.first is None:
        raise RuntimeError(f"HF generate returned {tuple(tokens.shape)} new ids, wanted {n}")
    return Run(clock.first - t0, t2 - t0, tokens)


def litgpt_generate(model: Any, prompts: torch.Tensor, n: int) -> Run:
    """litgpt's own decode loop (batch 1), greedy, exactly n new tokens."""
    from litgpt.generate.base import generate_fn

    if prompts.shape[0] != 1:
        raise ValueError("litgpt's generate_fn decodes one prompt at a time")
    p = prompts.shape[1]
    t0 = time.perf_counter()
    model.set_kv_cache(batch_size=1, max_seq_length=p + n)
    stream = generate_fn(  # greedy needs top_p 0 too: with top_p > 0 litgpt samples
        model, prompts[0], p + n, temperature=0.0, top_p=0.0, include_prompt=False, include_eos=True
    )
    out = [next(stream)]
    t1 = time.perf_counter()
    out.extend(stream)
    t2 = time.perf_counter()
    return Run(t1 - t0, t2 - t0, torch.stack([t.reshape(()) for t in out])[None])


COMPILED = "lmforge compiled"
COMPILED_BATCH = "lmforge batch compiled"


def lmforge_impl(batch: int) -> str:
    return "lmforge" if batch == 1 else "lmforge batch"


def decode(impl: str, ours: Any, hf: Any, prompts: torch.Tensor, n: int, litgpt: Any = None) -> Run:
    if impl == "hf":
        return hf_generate(hf, prompts, n)
    if impl == "litgpt":
        return litgpt_generate(litgpt, prompts, n)
    if impl == "lmforge":
        return lmforge_generate(ours, prompts, n)
    if impl == COMPILED:
        return lmforge_generate(ours, prompts, n, compile=True)
    return lmforge_batch(ours, prompts, n, compile=impl == COMPILED_BATCH)


# ---------------------------------------------------------------------------------------------
# parity


def compare_ids(
    ours: Any, hf: Any, prompts: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> dict[str, Any]:
    """Greedy ids a (lmforge) vs b (HF), (B, N) each: equal, or per row the first differing step
    and, for the first such row, both models' logit gap between the two candidates there."""
    rows = []
    for r in range(a.shape[0]):
        diff = (a[r] != b[r]).nonzero().flatten()
        rows.append(None if diff.numel() == 0 else int(diff[0]))
    result: dict[str, Any] = {"equal": all(s is None for s in rows), "first_diff_step": rows}
    parted = [(r, s) for r, s in enumerate(rows) if s is not None]
    if parted:
        r, s = parted[0]
        ta, tb = int(a[r, s]), int(b[r, s])
        ctx = torch.cat([prompts[r], a[r, :s]])[None]  # the common prefix before the split
        lo = ours(ctx)[0, -1].float()
        lh = hf(input_ids=ctx, use_cache=False).logits[0, -1].float()
        result.update(
            row=r,
            step=s,
            lmforge_token=ta,
            hf_token=tb,
            lmforge_logit_gap=float(lo[ta] - lo[tb]),
            hf_logit_gap=float(lh[ta] - lh[tb]),
        )
    return result


def describe_parity(p: dict[str, Any], n: int) -> str:
    if p["equal"]:
        return f"identical ({n} tokens per row)"
    parted = sum(s is not None for s in p["first_diff_step"])
    return (
        f"DIFFER in {parted}/{len(p['first_diff_step'])} rows; first at row {p['row']} step "
        f"{p['step']} of {n}: lmforge {p['lmforge_token']} vs HF {p['hf_token']}; logit("
        f"lmforge's) - logit(HF's) there: lmforge {p['lmforge_logit_gap']:+.3g}, HF "
        f"{p['hf_logit_gap']:+.3g} (a near-tie if both are ~0)"
    )


# ---------------------------------------------------------------------------------------------
# main


def bench_dtype(
    name: str, args: argparse.Namespace, prompts: torch.Tensor, meter: CpuMeter
) -> tuple[list[Series], dict[str, Any]]:
    """Parity check at batch 1, then warm-up and alternating timed rounds per batch size."""
    ours, hf, diff = build_models(DTYPES[name])  # outside inference mode: parameters stay normal
    litgpt = None
    if litgpt_installed():
        block = max(64, args.prompt_tokens + args.new_tokens)  # 64: the logits check
        litgpt, check = build_litgpt(ours.float(), block)
        ours.to(DTYPES[name])
        litgpt = litgpt.eval().to(DTYPES[name])
        print(f"litgpt: fp32 logits max|diff| vs lmforge {check['logits_maxdiff_vs_lmforge']:.2e}")
    with torch.inference_mode():
        return _bench_dtype(name, args, prompts, meter, ours, hf, diff, litgpt)


def _bench_dtype(
    name: str,
    args: argparse.Namespace,
    prompts: torch.Tensor,
    meter: CpuMeter,
    ours: Any,
    hf: Any,
    diff: float,
    litgpt: Any = None,
) -> tuple[list[Series], dict[str, Any]]:
    n = args.new_tokens
    info: dict[str, Any] = {
        "fp32_logits_maxdiff": diff,
        "hf_attn": hf.config._attn_implementation,
        "weight_bytes_per_token": weight_bytes_per_token(ours),
        "kv_bytes_last_step": kv_bytes_at(ours, args.prompt_tokens + n - 1),
    }
    print(
        f"\n== {name}: fp32 logits max|diff| lmforge vs HF (same weights, before the cast) "
        f"{diff:.2e}; HF attn {info['hf_attn']}; weights read per token "
        f"{info['weight_bytes_per_token'] / 1e6:.1f} MB, KV cache at the last step "
        f"{info['kv_bytes_last_step'] / 1e6:.2f} MB per sequence",
        flush=True,
    )

    one = prompts[:1]
    parity = compare_ids(
        ours, hf, one, lmforge_generate(ours, one, n).tokens, hf_generate(hf, one, n).tokens
    )
    info["parity_batch1"] = parity
    print(f"greedy ids, batch 1, lmforge generate vs HF generate: {describe_parity(parity, n)}")

    series = []
    for batch in args.batch_sizes:
        x = prompts[:batch]
        impls = [lmforge_impl(batch), "hf"]
        impls += [COMPILED if batch == 1 else COMPILED_BATCH] if args.compile else []
        impls += ["litgpt"] if litgpt is not None and batch == 1 else []
        group = {impl: Series(impl, name, batch) for impl in impls}
        warm = {}
        for _ in range(max(args.warmup, int(args.compile))):  # compiles on the 1st
            for impl in impls:
                t0 = time.perf_counter()
                warm[impl] = decode(impl, ours, hf, x, n, litgpt)
                key = f"compile_s_batch{batch}"
                if impl in (COMPILED, COMPILED_BATCH) and key not in info:
                    info[key] = time.perf_counter() - t0
                    print(f"{impl}: first generation (compiling) {info[key]:.1f} s")
        for impl in [i for i in impls if i != "hf" and (batch > 1 or i != "lmforge")]:
            p = compare_ids(ours, hf, x, warm[impl].tokens, warm["hf"].tokens)
            info[f"parity_batch{batch}_{impl}"] = p
            print(f"greedy ids, batch {batch}, {impl} vs HF: {describe_parity(p, n)}")
        foreign = []
        for r in range(args.rounds):
            k = r % len(impls)
            meter.start()
            for impl in impls[k:] + impls[:k]:
                group[impl].runs.append(decode(impl, ours, hf, x, n, litgpt))
            foreign.append(meter.stop()[0])
            print(
                f"  {name} batch {batch} round {r + 1}/{args.rounds}: "
                + "  ".join(
                    f"{impl} prefill {1e3 * s.runs[-1].prefill_s:.1f} ms, decode "
                    f"{batch * s.runs[-1].decode_tok_s():.1f} tok/s"
                    for impl, s in group.items()
                )
                + f"  | other procs {100 * foreign[-1]:.0f}% CPU",
                flush=True,
            )
        info[f"other_cpu_batch{batch}"] = foreign
        series += group.values()
    return series, info


def report(series: list[Series], bandwidth: float, infos: dict[str, dict[str, Any]]) -> list[dict]:
    bound1 = {d: bandwidth / info["weight_bytes_per_token"] for d, info in infos.items()}
    hf_rate = {(s.dtype, s.batch): s.decode_tok_s for s in series if s.impl == "hf"}
    head = [
        "impl",
        "dtype",
        "batch",
        "prefill ms",
        "decode tok/s (median)",
        "% of bandwidth bound",
        "/ HF",
    ]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    rows = []
    for s in series:
        bound = s.batch * bound1[s.dtype]
        ratio = s.decode_tok_s / hf_rate[(s.dtype, s.batch)] if s.impl != "hf" else None
        cells = [
            s.impl,
            s.dtype,
            str(s.batch),
            f"{s.prefill_ms:.1f}",
            f"{s.decode_tok_s:.1f}",
            f"{100 * s.decode_tok_s / bound:.1f}%",
            f"{ratio:.2f}" if ratio is not None else "-",
        ]
        print("| " + " | ".join(cells) + " |")
        rows.append(
            {
                "impl": s.impl,
                "dtype": s.dtype,
                "batch": s.batch,
                "prefill_ms_median": s.prefill_ms,
                "decode_tok_s_median": s.decode_tok_s,
                "bandwidth_bound_tok_s": bound,
                "fraction_of_bound": s.decode_tok_s / bound,
                "ratio_lmforge_over_hf": ratio,
                "rounds": [
                    {"prefill_s": r.prefill_s, "total_s": r.total_s, "tok_s": r.decode_tok_s()}
                    for r in s.runs
                ],
            }
        )
    print(
        "\nprefill = time to the first new token (median); decode tok/s = (N-1)/(total - prefill)"
        " per sequence x batch; bound = batch x measured bandwidth / weight bytes read per token;"
        "\n'lmforge' = generate_stream (its generate API), 'lmforge compiled' = the same with"
        " generate.compile, 'lmforge batch' = generate_batch (and 'compiled' with it); / HF ="
        " the row's decode tok/s"
        " over HF's (same dtype and batch)."
    )
    for d, b in bound1.items():
        print(f"bandwidth-bound decode at batch 1, {d}: {b:.0f} tok/s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length per sequence")
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens generated per sequence")
    ap.add_argument("--batch-sizes", default="1,8", help="comma-separated, e.g. 1,8")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per implementation")
    ap.add_argument("--warmup", type=int, default=1, help="untimed generations each, per batch")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="also time generate.compile (batch 1)")
    ap.add_argument("--bandwidth-mb", type=int, default=256, help="size of the copied tensor")
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    args = ap.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        ap.error("--batch-sizes needs positive integers")
    if args.prompt_tokens < 1 or args.new_tokens < 2 or args.rounds < 1 or args.warmup < 0:
        ap.error("need --prompt-tokens >= 1, --new-tokens >= 2, --rounds >= 1, --warmup >= 0")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import transformers

    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    load_before = load_average()
    machine = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }
    print(
        f"{machine['cpu']} ({machine['logical_cpus']} logical CPUs, "
        f"{machine['cpu_capability']}); torch {machine['torch']}, transformers "
        f"{machine['transformers']}, threads {machine['threads']}"
    )
    print(f"load average before: {load_before}")
    print(
        f"config {REF}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, "
        f"batch sizes {args.batch_sizes}, {args.warmup} warm-up + {args.rounds} timed rounds"
    )

    meter = CpuMeter()
    bandwidth = measure_bandwidth(args.bandwidth_mb)
    other = meter.stop()[0]
    print(
        f"memory bandwidth: {bandwidth / 1e9:.1f} GB/s (best of 8 copies of {args.bandwidth_mb} MB,"
        f" read + write; other processes used {100 * other:.0f}% CPU meanwhile)",
        flush=True,
    )

    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(
        0, REF["vocab_size"], (max(args.batch_sizes), args.prompt_tokens), generator=g
    )
    series: list[Series] = []
    infos: dict[str, dict[str, Any]] = {}
    for d in dtypes:
        s, infos[d] = bench_dtype(d, args, prompts, meter)
        series += s
    rows = report(series, bandwidth, infos)
    load_after = load_average()
    print(f"load average before: {load_before}, after: {load_after}")

    if args.out:
        result = {
            "machine": machine,
            "load_average": {"before": load_before, "after": load_after},
            "config": REF,
            "args": vars(args),
            "bandwidth_bytes_per_s": bandwidth,
            "per_dtype": infos,
            "rows": rows,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
