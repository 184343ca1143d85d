"""Training-step throughput of lmforge's Llama vs HF transformers on the reference config.

Reference config (same as shared/perf-anchors): vocab 32000, 6 layers, d_model 512, 8 heads / 4 KV
heads, SwiGLU d_ff 1408, untied head, T=512, micro-batch 4 (2048 tokens/step), AdamW (foreach).
One step = forward, fp32 cross-entropy, backward, grad-norm clip, AdamW step, zero_grad. HF
computes the cross-entropy over full fp32 logits; lmforge as its trainer does (the chunked head
loss fused with its gradient, model/loss.py), or over full logits with `--lmforge-loss full`.
Variants:

- lmforge, document masking ON: packed rows of several documents, positions reset per document
  (the mask kernel follows ModelConfig.attention; "auto" uses the dense bool mask on CPU at
  T <= 256 in fp32 and T <= 512 in bf16, the split kernel above);
- lmforge, plain causal (positions=None, SDPA is_causal);
- HF LlamaForCausalLM(attn_implementation="sdpa"), plain causal, same weights as lmforge;
- litgpt's GPT with a Config of the same shape (when litgpt is installed), plain causal, same
  weights (converted by litgpt's own HF-checkpoint converter). litgpt 0.5.12 pins
  huggingface-hub < 0.35, which transformers 5 refuses: `pip install litgpt==0.5.12`, then
  `pip install 'huggingface-hub>=1.31,<3'` (litgpt's model code does not use the hub).

Each variant runs in its own subprocess, so its peak RSS (ru_maxrss) is its own. All variants of one
precision are alive at once and the parent makes them take turns one step at a time (rotating the
order each round), so slow drifts of the noisy VM hit every variant alike. Only one process
computes at any time.

    python benchmarks/train_throughput.py --dtype both                 # eager, ~4-5 min
    python benchmarks/train_throughput.py --dtype bf16 --compile       # + torch.compile variants
    python benchmarks/train_throughput.py --profile lmforge/doc/bf16   # op table of one step
    python benchmarks/train_throughput.py --dtype fp32 --lmforge-loss fused,full  # loss A/B
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from cpu_meter import CpuMeter

THREADS = 2
REF = dict(
    vocab_size=32_000,
    num_layers=6,
    d_model=512,
    num_heads=8,
    num_kv_heads=4,
    d_ff=1408,
    rope_theta=10_000.0,
    tie_embeddings=False,
)
BATCH, SEQ_LEN = 4, 512
QUIET = 0.10  # a round is "quiet" when other processes used < 10% of the CPUs during it
TAG = "@@"  # prefix of protocol lines on a child's stdout; anything else is passed through


@dataclass(frozen=True)
class Variant:
    impl: str  # lmforge | hf | litgpt
    masking: str  # doc | causal
    dtype: str  # fp32 | bf16
    compiled: bool
    attention: str = "auto"  # lmforge ModelConfig.attention (matters for doc masking only)
    loss: str = "full"  # full: cross-entropy over full logits | fused: the trainer's model loss
    recompute: str = "none"  # lmforge parallel.activation_checkpointing: none | full | every
    malloc: str = "system"  # heap: lmforge.perf.keep_freed_memory() first (the trainer's way)

    @property
    def name(self) -> str:
        mode = "compiled" if self.compiled else "eager"
        masking = f"doc-{self.attention}" if self.masking == "doc" else self.masking
        extra = "" if self.recompute == "none" else f"/recompute-{self.recompute}"
        extra += "/heap" if self.malloc == "heap" else ""
        return f"{self.impl}/{masking}/{self.dtype}/{mode}/{self.loss}{extra}"


# ---------------------------------------------------------------------------------------------
# data


def packed_positions(doc_len: float, seed: int = 1234) -> tuple[torch.Tensor, list[int]]:
    """(B, T) positions of rows packed with documents of random length (mean ~doc_len).

    Lengths are exponential with mean doc_len (at least 8 tokens); the last document of a row is
    cut at the row end, as a packer does. Returns the positions and all document lengths.
    """
    rng = random.Random(seed)
    rows, lengths = [], []
    for _ in range(BATCH):
        row: list[int] = []
        while len(row) < SEQ_LEN:
            n = min(max(8, round(rng.expovariate(1.0 / doc_len))), SEQ_LEN - len(row))
            row.extend(range(n))
            lengths.append(n)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64), lengths


def make_batch(
    v: Variant, doc_len: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, REF["vocab_size"], (BATCH, SEQ_LEN), generator=g)
    labels = torch.randint(0, REF["vocab_size"], (BATCH, SEQ_LEN), generator=g)
    positions = packed_positions(doc_len)[0] if v.masking == "doc" else None
    return ids, labels, positions


# ---------------------------------------------------------------------------------------------
# models


def model_config(attention: str = "auto"):
    from lmforge.model.config import ModelConfig

    return ModelConfig(**REF, attention=attention)  # type: ignore[arg-type]


def build_model(v: Variant) -> tuple[torch.nn.Module, dict]:
    """The model of a variant; HF gets lmforge's initial weights (renamed) and a logits check."""
    from lmforge.model.llama import Llama

    torch.manual_seed(0)
    ours = Llama(model_config(v.attention))
    if v.impl == "lmforge":
        if v.recompute != "none":  # as the trainer applies parallel.activation_checkpointing
            from lmforge.train.parallelize import ParallelConfig, apply_activation_checkpointing

            cfg = ParallelConfig(activation_checkpointing=v.recompute)  # type: ignore[arg-type]
            apply_activation_checkpointing(ours, cfg)
        return ours, {}
    if v.impl == "litgpt":
        return build_litgpt(ours)
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.export import hf_config, hf_state_dict

    hcfg = LlamaConfig(**hf_config(ours.cfg))
    hcfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hcfg)
    hf.load_state_dict(hf_state_dict(ours), strict=True)
    with torch.no_grad():  # same weights ⇒ same logits (fp32, plain causal)
        x = torch.randint(0, REF["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(3))
        diff = (ours(x) - hf(input_ids=x, use_cache=False).logits).abs().max().item()
    del ours
    peer = f"HF transformers, attn={hf.config._attn_implementation}"
    return hf, {"logits_maxdiff_vs_lmforge": diff, "peer": peer}


def litgpt_installed() -> bool:
    try:
        import litgpt.model  # noqa: F401
    except ImportError:
        return False
    return True


def build_litgpt(ours: torch.nn.Module, block_size: int = SEQ_LEN) -> tuple[torch.nn.Module, dict]:
    """litgpt's GPT of the reference shape with lmforge's weights, and a logits check."""
    from litgpt.config import Config
    from litgpt.model import GPT
    from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama

    from lmforge.export import hf_state_dict

    cfg = Config(
        name="lmforge-reference",
        block_size=block_size,
        vocab_size=REF["vocab_size"],
        padded_vocab_size=REF["vocab_size"],
        n_layer=REF["num_layers"],
        n_embd=REF["d_model"],
        n_head=REF["num_heads"],
        n_query_groups=REF["num_kv_heads"],
        intermediate_size=REF["d_ff"],
        rotary_percentage=1.0,
        rope_base=int(REF["rope_theta"]),
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        norm_eps=ours.cfg.norm_eps,
        mlp_class_name="LLaMAMLP",
    )
    model = GPT(cfg)
    state: dict[str, torch.Tensor] = {}
    copy_weights_hf_llama(cfg, {}, state, hf_state_dict(ours))
    model.load_state_dict(state, strict=True)
    with torch.no_grad():  # same weights => same logits (fp32, plain causal)
        x = torch.randint(0, REF["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(3))
        diff = (ours(x) - model(x)).abs().max().item()
    return model, {"logits_maxdiff_vs_lmforge": diff, "peer": "litgpt"}


def make_step(v: Variant, model: torch.nn.Module, doc_len: float):
    from lmforge.train.config import auto_loss_chunk
    from lmforge.train.optim import OptimConfig, build_optimizer

    ocfg = OptimConfig()
    opt = build_optimizer(model, ocfg)
    params = [p for p in model.parameters() if p.requires_grad]
    fwd = torch.compile(model) if v.compiled else model
    ids, labels, positions = make_batch(v, doc_len)
    amp = v.dtype == "bf16"

    def loss_of() -> torch.Tensor:
        if v.impl == "hf":
            logits = fwd(input_ids=ids, use_cache=False).logits
        elif v.impl == "litgpt":
            logits = fwd(ids)
        elif v.loss == "full":
            logits = fwd(ids, positions)
        elif v.loss == "checkpointed":  # the trainer's loss before the fused one
            hidden = fwd.hidden_states(ids, positions)
            return checkpointed_loss(hidden, fwd.lm_head.weight, labels) / labels.numel()
        else:  # what lmforge's trainer calls: the fused, chunked head loss (summed)
            chunk = auto_loss_chunk(REF["vocab_size"], "cpu")
            return fwd(ids, positions, labels=labels, loss_chunk_tokens=chunk) / labels.numel()
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_of()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, ocfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def checkpointed_loss(hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor):
    """Summed cross-entropy in chunks under activation checkpointing (logits recomputed)."""
    from torch.utils.checkpoint import checkpoint

    from lmforge.train.config import auto_loss_chunk

    def piece(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(h, head).float(), y, reduction="sum")

    chunk = auto_loss_chunk(REF["vocab_size"], "cpu")
    pieces = zip(hidden.flatten(0, 1).split(chunk), labels.flatten().split(chunk), strict=True)
    return sum(checkpoint(piece, h, y, use_reentrant=False) for h, y in pieces)


def attention_kernel(v: Variant) -> str:
    if v.impl != "lmforge":
        return f"sdpa ({'HF' if v.impl == 'hf' else v.impl} causal)"
    if v.masking == "causal":
        return "sdpa is_causal"
    from lmforge.model.attention import plan_document_mask

    positions = torch.arange(SEQ_LEN)[None]
    dtype = torch.bfloat16 if v.dtype == "bf16" else torch.float32
    plan = plan_document_mask(positions, v.attention, dtype)  # type: ignore[arg-type]
    dense = plan.dense is not None
    return f"{'dense bool mask' if dense else 'split per-doc'} (attention={v.attention})"


# ---------------------------------------------------------------------------------------------
# child process: build, warm up, then one timed step per "step" line on stdin


def _say(**msg) -> None:
    sys.stdout.write(TAG + json.dumps(msg) + "\n")
    sys.stdout.flush()


def child_main(spec: str, warmup: int, doc_len: float) -> None:
    import psutil

    torch.set_num_threads(THREADS)
    v = Variant(**json.loads(spec))
    proc = psutil.Process()
    rss_base = proc.memory_info().rss  # after imports (transformers only in HF children)
    if v.malloc == "heap":
        from lmforge.perf import keep_freed_memory

        keep_freed_memory()
    model, info = build_model(v)
    step = make_step(v, model, doc_len)
    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        step()
        warm.append(time.perf_counter() - t0)
    _say(event="ready", warmup_s=warm, rss_base=rss_base, **info)
    loss = float("nan")
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        loss = step()
        _say(event="step", t=time.perf_counter() - t0)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    _say(event="done", peak_rss=maxrss, rss_end=proc.memory_info().rss, loss=loss)


# ---------------------------------------------------------------------------------------------
# parent


class Child:
    def __init__(self, v: Variant, args: argparse.Namespace) -> None:
        self.v = v
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            json.dumps(asdict(v)),
            "--warmup",
            str(args.warmup),
            "--doc-len",
            str(args.doc_len),
        ]
        self.p = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.times: list[float] = []
        self.foreign: list[float] = []  # other processes' CPU share during each round
        self.info: dict = {}

    def recv(self) -> dict:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG) :])
            sys.stderr.write(f"[{self.v.name}] {line}")
        raise RuntimeError(f"{self.v.name}: child exited with {self.p.wait()}")

    def send(self, cmd: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()


def measure_peaks(dtypes: list[str], n: int) -> dict[str, float]:
    from lmforge.perf import measure_matmul_peak

    torch.set_num_threads(THREADS)
    out = {}
    for d in dtypes:
        dt = torch.bfloat16 if d == "bf16" else torch.float32
        out[d] = max(measure_matmul_peak(dt, "cpu", n=n, repeats=8) for _ in range(2))
        print(
            f"matmul peak {d}: {out[d] / 1e9:.0f} GFLOP/s (best of 2x8 {n}^3 torch.mm)", flush=True
        )
    return out


def wait_quiet(args: argparse.Namespace, budget: list[float]) -> None:
    """Sleep (within the --quiet-wait budget) while other processes load the CPUs > 15%."""
    import psutil

    while budget[0] > 0:
        load = psutil.cpu_percent(interval=1.0)  # our children are idle between steps
        budget[0] -= 1.0
        if load < 15:
            return
        print(
            f"  (other processes use {load:.0f}% CPU; waiting, {budget[0]:.0f} s of "
            "--quiet-wait left)",
            flush=True,
        )
        time.sleep(min(4.0, max(budget[0], 0)))
        budget[0] -= 4.0


def run_group(
    variants: list[Variant], args: argparse.Namespace, budget: list[float], meter: CpuMeter
) -> list[Child]:
    """Start the variants one at a time (each builds and warms up alone), then alternate steps."""
    children = []
    for v in variants:
        t0 = time.perf_counter()
        c = Child(v, args)
        c.info = c.recv()
        print(
            f"  ready {v.name:32s} in {time.perf_counter() - t0:5.1f} s (warm-up steps "
            + ", ".join(f"{t:.2f}" for t in c.info["warmup_s"])
            + " s)",
            flush=True,
        )
        children.append(c)
    for r in range(args.steps):
        wait_quiet(args, budget)
        meter.start()
        k = r % len(children)
        for c in children[k:] + children[:k]:
            c.send("step")
            c.times.append(c.recv()["t"])
        other, steal, _ = meter.stop()
        for c in children:
            c.foreign.append(other)
        print(
            f"  round {r + 1}/{args.steps}: "
            + "  ".join(f"{c.v.name}={c.times[-1]:.2f}s" for c in children)
            + f"  | other procs {100 * other:.0f}% CPU, steal {100 * steal:.0f}%",
            flush=True,
        )
    for c in children:
        c.send("stop")
        c.info.update(c.recv())
        c.p.wait()
    return children


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument(
        "--impl",
        choices=["lmforge", "hf", "litgpt", "all"],
        default="all",
        help="all: lmforge, HF and, when installed, litgpt",
    )
    ap.add_argument("--compile", action="store_true", help="also run torch.compile'd variants")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager variants")
    ap.add_argument(
        "--masking",
        default="doc,causal",
        help="lmforge masking variants, comma-separated: doc, causal",
    )
    ap.add_argument(
        "--lmforge-loss",
        default="fused",
        help="lmforge loss variants, comma-separated: fused (the trainer's chunked head loss), "
        "full (cross-entropy over full fp32 logits, as HF), checkpointed (chunks whose logits "
        "the backward recomputes: the trainer's loss before the fused one)",
    )
    ap.add_argument(
        "--attention",
        default="auto",
        help="lmforge ModelConfig.attention for the doc-masked variants, comma-separated: auto,"
        " dense, split",
    )
    ap.add_argument(
        "--recompute",
        default="none",
        help="lmforge activation checkpointing variants, comma-separated: none, full (every"
        " block's activations recomputed in the backward), every (every 2nd block)",
    )
    ap.add_argument(
        "--malloc",
        default=None,
        help="allocator modes run by every impl, comma-separated: heap (glibc keeps freed "
        "memory, as lmforge's trainer sets it), system (glibc's default); default: lmforge "
        "heap, peers system, as each ships",
    )
    ap.add_argument("--doc-len", type=float, default=128.0, help="mean packed document length")
    ap.add_argument("--peak-n", type=int, default=2048, help="matmul size for the MFU peak")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="seconds in all to wait, before rounds, for other processes to go idle",
    )
    ap.add_argument(
        "--profile",
        metavar="VARIANT",
        default=None,
        help="profile one step in-process, e.g. lmforge/doc/bf16 or hf/causal/fp32",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child is not None:
        child_main(args.child, args.warmup, args.doc_len)
        return
    if args.profile is not None:
        profile(args)
        return

    torch.set_num_threads(THREADS)
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    impls = ["lmforge", "hf"] if args.impl == "all" else [args.impl]
    if args.impl == "all" and litgpt_installed():
        impls.append("litgpt")
    modes = ([] if args.no_eager else [False]) + ([True] if args.compile else [])
    maskings = [m for m in args.masking.split(",") if m]
    losses = [m for m in args.lmforge_loss.split(",") if m]
    attentions = [a for a in args.attention.split(",") if a]
    recomputes = [r for r in args.recompute.split(",") if r]
    mallocs = [m for m in (args.malloc or "").split(",") if m]
    if set(mallocs) - {"heap", "system"}:
        ap.error(f"--malloc takes heap, system; got {args.malloc}")
    if set(attentions) - {"auto", "dense", "split"}:
        ap.error(f"--attention takes auto, dense, split; got {args.attention}")
    cfg = model_config(attentions[0])
    fpt = cfg.flops_per_token(SEQ_LEN)
    _, lengths = packed_positions(args.doc_len)
    print(
        f"torch {torch.__version__}, threads {THREADS}, cpu capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} logical CPUs"
    )
    print(
        f"config {REF}, B={BATCH} T={SEQ_LEN}; params {cfg.num_params() / 1e6:.2f}M, "
        f"FLOPs/token (6N+12LdT) {fpt / 1e6:.1f}M"
    )
    print(
        f"doc masking: {len(lengths)} documents in {BATCH} rows, mean length "
        f"{statistics.mean(lengths):.0f}, max {max(lengths)} (seeded, mean param {args.doc_len})"
    )
    budget = [float(args.quiet_wait)]
    meter = CpuMeter()
    wait_quiet(args, budget)
    meter.start()
    peaks = measure_peaks(dtypes, args.peak_n)
    print(f"(other processes used {100 * meter.stop()[0]:.0f}% CPU during the peak runs)")

    results: list[Child] = []
    for d in dtypes:  # one group per precision: ratios compare variants that took turns
        group = []
        for compiled in modes:
            for impl in impls:
                for m in maskings if impl == "lmforge" else ["causal"]:
                    for loss in losses if impl == "lmforge" else ["full"]:
                        for att in attentions if m == "doc" else ["auto"]:
                            for rc in recomputes if impl == "lmforge" else ["none"]:
                                for mode in mallocs or malloc_of(impl):
                                    group.append(Variant(impl, m, d, compiled, att, loss, rc, mode))
        print(
            f"\n== {d}: {len(group)} variants, {args.warmup} warm-up + {args.steps} timed steps "
            "each, alternating",
            flush=True,
        )
        results += run_group(group, args, budget, meter)
    report(results, peaks, fpt)


def malloc_of(impl: str) -> list[str]:
    return ["heap" if impl == "lmforge" else "system"]


def report(results: list[Child], peaks: dict[str, float], fpt: float) -> None:
    ntok = BATCH * SEQ_LEN
    rows, tps, qtps = [], {}, {}
    for c in results:
        v, med = c.v, statistics.median(c.times)
        quiet = [t for t, f in zip(c.times, c.foreign, strict=True) if f < QUIET]
        qmed = statistics.median(quiet) if quiet else float("nan")
        tps[v] = ntok / med
        qtps[v] = ntok / qmed
        rows.append(
            [
                v.impl,
                v.dtype if v.dtype == "fp32" else "bf16-autocast",
                "compiled" if v.compiled else "eager",
                ("doc, " if v.masking == "doc" else "causal, ") + attention_kernel(v),
                (v.loss if v.recompute == "none" else f"{v.loss}, recompute {v.recompute}")
                + f", {v.malloc}",
                f"{med:.3f}",
                f"{min(c.times):.3f}",
                f"{tps[v]:.0f}",
                f"{100 * tps[v] * fpt / peaks[v.dtype]:.1f}%",
                f"{c.info['peak_rss'] / 2**30:.2f}",
                f"{c.info['rss_base'] / 2**30:.2f}",
                f"{c.info['loss']:.3f}",
                f"{100 * statistics.mean(c.foreign):.0f}%",
            ]
        )
    head = [
        "impl",
        "precision",
        "mode",
        "masking / attention kernel",
        "loss (recompute), malloc",
        "step s (med)",
        "step s (min)",
        "tok/s",
        "MFU",
        "peak RSS GiB",
        "base RSS GiB",
        "loss value",
        "other CPU",
    ]
    print(
        "\n"
        + "peak used for MFU: "
        + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items())
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(
        "\npeak RSS = ru_maxrss of the variant's own subprocess (whole life: imports, model, "
        "optimizer state, warm-up, compile); base RSS = after imports, before the model;\n"
        "other CPU = mean share of the 2 CPUs used by processes outside this benchmark "
        "during its rounds."
    )
    for c in results:
        if "logits_maxdiff_vs_lmforge" in c.info:
            print(
                f"{c.v.name}: {c.info['peer']}, fp32 logits max|diff| vs lmforge with "
                f"the same weights = {c.info['logits_maxdiff_vs_lmforge']:.2e}"
            )
    print()
    for peer, name in (("hf", "HF"), ("litgpt", "litgpt")):
        for v, t in tps.items():
            for mode in ("system", "heap"):
                ref = Variant(peer, "causal", v.dtype, v.compiled, malloc=mode)
                if v.impl != "lmforge" or ref not in tps:
                    continue
                print(
                    f"ratio lmforge/{name}-{mode} tok/s  {v.dtype:4s} "
                    f"{'compiled' if v.compiled else 'eager':8s} lmforge {v.masking:6s} "
                    f"{v.loss:5s} loss, attention {v.attention}, recompute {v.recompute}, "
                    f"malloc {v.malloc}: {t / tps[ref]:.2f}"
                )


def profile(args: argparse.Namespace) -> None:
    """Top ops of one step of a variant (eager), after warm-up, in this process."""
    torch.set_num_threads(THREADS)
    impl, masking, dtype, *rest = args.profile.split("/")
    loss = rest[0] if rest else ("fused" if impl == "lmforge" else "full")
    malloc = (args.malloc or malloc_of(impl)[0]).split(",")[0]
    v = Variant(impl, masking, dtype, args.compile, args.attention, loss, malloc=malloc)
    if malloc == "heap":
        from lmforge.perf import keep_freed_memory

        keep_freed_memory()
    model, _ = build_model(v)
    step = make_step(v, model, args.doc_len)
    for _ in range(max(args.warmup, 1)):
        step()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    print(f"{v.name}: profiled step {time.perf_counter() - t0:.2f} s (profiler overhead included)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
