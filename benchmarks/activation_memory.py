"""Where a training step's memory goes: saved activations by module and the live peak by kind.

Builds the reference config of `train_throughput.py` (document-masked rows, the trainer's fused
head loss) and reports two measurements:

1. The bytes autograd saves for the backward, by the module that saved them (saved-tensor hooks;
   parameters left out; a storage counted once), in bytes per token and block. This is the
   quantity `lmforge plan` models.
2. One whole step (forward, loss, backward, clip, AdamW, zero_grad) under the PyTorch profiler's
   memory timeline: the peak of live tensor bytes and its split into parameters, optimizer
   state, activations, gradients and temporaries. This omits the interpreter and library base
   and the allocator's free-but-resident pages, which ru_maxrss (`train_throughput.py`) includes.

`--plain` also runs the model with RMSNorm and SwiGLU left to plain autograd, as lmforge had
them before model/fused.py, in the same process, so the two can be compared.

    python benchmarks/activation_memory.py                 # fp32
    python benchmarks/activation_memory.py --dtype bf16    # bf16 autocast
    python benchmarks/activation_memory.py --plain         # and the plain-autograd modules
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402

from lmforge.model import llama  # noqa: E402
from lmforge.train.config import auto_loss_chunk  # noqa: E402


@contextlib.contextmanager
def plain_autograd_modules():
    """RMSNorm and MLP as lmforge wrote them before model/fused.py: every op saves its own."""

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    saved = llama.RMSNorm.forward, llama.MLP.forward
    llama.RMSNorm.forward, llama.MLP.forward = norm, mlp  # type: ignore[method-assign]
    try:
        yield
    finally:
        llama.RMSNorm.forward, llama.MLP.forward = saved  # type: ignore[method-assign]


def saved_by_module(v: tt.Variant, doc_len: float) -> tuple[int, collections.Counter[str]]:
    """Total saved bytes and bytes by module kind (e.g. 'mlp', 'q_proj', 'head')."""
    model, _ = tt.build_model(v)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack = ["head"]  # the loss, outside every block, saves the head's gradients
    for name, module in model.named_modules():
        if name.startswith("layers.") and name.count(".") >= 2 or name == "norm":
            kind = name.rsplit(".", 1)[-1] if name != "norm" else "final norm"
            module.register_forward_pre_hook(lambda m, a, kind=kind: stack.append(kind))
            module.register_forward_hook(lambda m, a, o: stack.pop() and None)
    seen: set[int] = set()
    by_kind: collections.Counter[str] = collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            by_kind[stack[-1]] += t.untyped_storage().nbytes()
        return t

    ids, labels, positions = tt.make_batch(v, doc_len)
    chunk = auto_loss_chunk(tt.REF["vocab_size"], "cpu")
    amp = v.dtype == "bf16"
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp),
    ):
        model(ids, positions, labels=labels, loss_chunk_tokens=chunk)
    return sum(by_kind.values()), by_kind


def live_peak(v: tt.Variant, doc_len: float) -> dict[str, int]:
    """Bytes by kind at the step's peak of live tensor bytes (second step: AdamW state exists)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

    model, _ = tt.build_model(v)
    step = tt.make_step(v, model, doc_len)
    step()
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    peak = max(sizes, key=sum)
    kinds = {c.name.lower() if c else "unknown": i + 1 for c, i in _CATEGORY_TO_INDEX.items()}
    return {"total": sum(peak)} | {k: peak[i] for k, i in kinds.items() if peak[i]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--doc-len", type=float, default=64.0, help="mean packed document length")
    ap.add_argument("--plain", action="store_true", help="also measure plain-autograd modules")
    args = ap.parse_args()
    torch.set_num_threads(tt.THREADS)
    v = tt.Variant(impl="lmforge", masking="doc", dtype=args.dtype, compiled=False, loss="fused")
    tokens, layers = tt.BATCH * tt.SEQ_LEN, tt.REF["num_layers"]
    variants = [("lmforge", contextlib.nullcontext)]
    if args.plain:
        variants.append(("plain autograd", plain_autograd_modules))

    results = {}
    for name, context in variants:
        with context():
            results[name] = saved_by_module(v, args.doc_len), live_peak(v, args.doc_len)

    mib = 2**20
    print(f"reference config, {args.dtype}, document-masked rows of mean length {args.doc_len:g}")
    print(f"{tokens} tokens, {layers} blocks; bytes per token and block = saved / tokens / blocks")
    print("\nsaved for the backward, by module:")
    outside = ["head", "final norm"]  # once per model, not per block
    kinds = sorted({k for (_, by), _ in results.values() for k in by} - set(outside))
    header = " | ".join(f"{n} MiB | {n} B/token/block" for n in results)
    print(f"| module | {header} |")
    print("|---|" + "---:|" * 2 * len(results))
    for kind in [*kinds, "all blocks", *outside, "total"]:
        cells = []
        for (total, by), _ in results.values():
            if kind == "all blocks":
                b = sum(by[k] for k in kinds)
            else:
                b = total if kind == "total" else by.get(kind, 0)
            per_block = "" if kind in [*outside, "total"] else f"{b / tokens / layers:,.0f}"
            cells += [f"{b / mib:.1f}", per_block]
        print(f"| {kind} | " + " | ".join(cells) + " |")

    print("\nlive tensor bytes at the step's peak (profiler memory timeline), MiB:")
    names = sorted({k for _, peak in results.values() for k in peak if k != "total"})
    print("| kind | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for kind in [*names, "total"]:
        cells = [f"{peak.get(kind, 0) / mib:.1f}" for _, peak in results.values()]
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
