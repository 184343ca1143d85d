"""Does llama.cpp run our GGUF export as lmforge runs the checkpoint? (via `llama-cpp-python`)

One model, exported as f32, f16 and bf16 GGUF. For each prompt (English, Chinese, code, digits,
unseen English, mixed) both engines get the SAME token ids (our tokenizer's, BOS first) and
decode greedily (llama.cpp: its own greedy sampler; lmforge: `generate` at temperature 0); the
generated ids should be equal. lmforge is compared twice: its fp32 checkpoint, and the same model
with its weights rounded as the GGUF stores them (matrices f16/bf16, norms f32), which separates
storage rounding from llama.cpp's own arithmetic. Logits are compared at every generated step
(lmforge teacher-forced on llama.cpp's ids), next to the smallest top-1/top-2 logit gap lmforge
saw: where that gap is below the logit difference, a greedy flip is rounding, not a bug. The
same f32 comparison is then run on deliberately broken exports (Q/K rows not interleaved, RoPE
base or RMSNorm eps written wrong) to show what a mistake would look like.

Also reported: what llama.cpp read from the header and the warnings it logged; whether its own
tokenization of text gives our ids, for the prompts and for the first 200 documents of each
built-in corpus, and whether its `llama_detokenize` gives our ids back as the exact text
(the exporter's "gpt-2" pre-tokenizer splits text with GPT-2's regex, which cuts newline runs
and punctuation+newline apart where ours keeps them, and turns on llama.cpp's space clean-up;
`--pre-tokenizer qwen2` tries another of llama.cpp's regexes); and decode tokens/s of both
engines on this model, for context (both are per-token overhead at this size).

By default a small model is first trained on a corpus small enough to learn by heart (~20 s on
2 idle cores), so that greedy output is text rather than one repeated token; pass
--run-dir (its latest checkpoint) or --checkpoint to use another. llama-cpp-python is not a
dependency: `.venv/bin/pip install -c constraints.txt llama-cpp-python` builds its CPU library
from source, natively (AVX-512 here), with no CMAKE_ARGS (`-DLLAVA_BUILD=OFF` skips multimodal).

    .venv/bin/python benchmarks/gguf_llamacpp.py
    .venv/bin/python benchmarks/gguf_llamacpp.py --run-dir runs/demo --pre-tokenizer qwen2
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from unittest import mock

import numpy as np
import torch
from cpu_meter import CpuMeter

import lmforge.export_gguf
from lmforge import pipeline
from lmforge.checkpoint_dirs import latest_checkpoint
from lmforge.data.chat import CHAT_TEMPLATE
from lmforge.data.corpus import iter_builtin
from lmforge.data.tokenizer import TextTokenizer
from lmforge.export_gguf import GGUFType, export_gguf
from lmforge.generate import GenerateConfig, generate_stream
from lmforge.model.llama import Llama
from lmforge.recipe import load_recipe

TRAIN_OVERRIDES = [
    # The first document of each built-in corpus (plus a code file held out for validation):
    # ~1.5K training tokens that a 1M-parameter model learns by heart in ~150 steps, so greedy
    # decoding continues real text instead of repeating one token (on the full corpora a few
    # minutes of CPU training only reach loss ~5 and greedy output is "ssss..." or "，，，...").
    "data.sources=[{name: english, path: 'builtin:english', max_bytes: 1},"
    " {name: chinese, path: 'builtin:chinese', max_bytes: 1},"
    " {name: code, path: 'builtin:code', max_bytes: 2500}]",
    "data.heldout_fraction=0.1",
    "data.workers=1",
    "tokenizer.vocab_size=1024",
    "model.vocab_size=1024",
    "model.num_layers=4",
    "model.d_model=128",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.d_ff=352",
    "model.rope_theta=50000",  # not llama.cpp's default, so a base it ignored would show
    "model.norm_eps=1e-6",  # likewise (llama.cpp's default is 1e-5)
    "packing.seq_len=256",  # llama.cpp rounds n_ctx up to 256: no "n_ctx > n_ctx_train"
    "train.micro_batch_size=4",
    "train.batch_tokens=1024",
    "train.save_every_steps=100000",
    "train.log_every_steps=20",
    "schedule.warmup_tokens=8000",
    "schedule.cooldown_tokens=20000",
    "eval.every_steps=100000",
    "eval.max_batches=4",
]
"""The demo recipe shrunk to a couple of minutes on 2 CPU cores, with non-default RoPE base and
RMSNorm eps; train.max_tokens comes from --train-tokens."""

PROMPTS = {
    "english": "Assert statements are a convenient way to",
    "chinese": "本人是一名大一学生，",
    "code": "class FixImports2(fix_imports.FixImports):\n\n    run_order",
    "digits": "因为人体的70%都是水，",
    "novel": "In 1998, the 12 months had 365 days and",
    "mixed": "用Python写一个函数：",
}
"""Four prompts from the default training text, two not in it ("novel", "mixed")."""

DTYPES = ("f32", "f16", "bf16")
TORCH_DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}


def train_small_model(run_dir: Path, max_tokens: int) -> Path:
    """Tokenizer, shards and a short pretraining run in run_dir; the last checkpoint."""
    overrides = [*TRAIN_OVERRIDES, f"train.max_tokens={max_tokens}", f"run_dir={run_dir}"]
    recipe = load_recipe(None, overrides)
    pipeline.train_tokenizer_stage(recipe)
    pipeline.tokenize_stage(recipe)
    records = pipeline.pretrain_stage(recipe)
    print(f"trained {len(records)} steps, last loss {records[-1]['loss']:.3f}")
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None
    return checkpoint


def rounded_copy(model: Llama, dtype: str) -> Llama:
    """The model with its matrices rounded to dtype and back, as the GGUF stores them."""
    copy = Llama(model.cfg).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in copy.parameters():
            if p.ndim > 1:  # norms stay f32 in the GGUF
                p.copy_(p.to(TORCH_DTYPES[dtype]).float())
    return copy


def pre_tokenizer(name: str | None) -> contextlib.AbstractContextManager[Any]:
    """Export with llama.cpp pre-tokenizer `name` instead of the exporter's (an experiment:
    `tokenizer.ggml.pre` picks the regex llama.cpp splits text with before BPE)."""
    import gguf

    if name is None:
        return contextlib.nullcontext()
    original = gguf.GGUFWriter.add_tokenizer_pre
    return mock.patch.object(
        gguf.GGUFWriter, "add_tokenizer_pre", lambda self, _: original(self, name)
    )


def broken_exports() -> dict[str, contextlib.AbstractContextManager[Any]]:
    """Exports with one thing wrong each: what a mistake would cost in the same comparison."""
    import gguf

    rope, eps = gguf.GGUFWriter.add_rope_freq_base, gguf.GGUFWriter.add_layer_norm_rms_eps
    return {
        "Q/K rows left in half-split order": mock.patch.object(
            lmforge.export_gguf, "interleave_rope_rows", lambda weight, heads: weight
        ),
        "RoPE base written / 5": mock.patch.object(
            gguf.GGUFWriter, "add_rope_freq_base", lambda self, base: rope(self, base / 5)
        ),
        "RMSNorm eps written x 10": mock.patch.object(
            gguf.GGUFWriter, "add_layer_norm_rms_eps", lambda self, e: eps(self, e * 10)
        ),
    }


# --- the two engines ----------------------------------------------------------------------------


def timed(tokens: Iterator[int], n: int) -> tuple[list[int], float]:
    """The first n tokens of a decode stream, and decode tokens/s after the first token."""
    out, stamps = [], []
    for token in tokens:
        out.append(int(token))
        stamps.append(time.perf_counter())
        if len(out) == n:
            break
    rate = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else float("nan")
    return out, rate


def lmforge_greedy(model: Llama, ids: list[int], n: int) -> tuple[list[int], float]:
    cfg = GenerateConfig(max_new_tokens=n, temperature=0.0)
    return timed(generate_stream(model, ids, cfg), n)


def llamacpp_greedy(llm: Any, ids: list[int], n: int) -> tuple[list[int], float]:
    """llama.cpp's own greedy sampler (temp 0, no penalties) from a fresh KV cache."""
    llm.reset()
    return timed(llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True), n)


def teacher_forced_logits(model: Llama, ids: list[int], new: list[int]) -> np.ndarray:
    """lmforge's logits (n, V) at each step of a decode that produced `new` after `ids`."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + new[:-1]]))[0, len(ids) - 1 :]
    return logits.float().numpy()


def agree(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two id sequences."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


class LlamaLog:
    """llama.cpp's WARN and ERROR log lines, collected instead of printed."""

    def __init__(self) -> None:
        import llama_cpp

        self.lines: list[str] = []
        self.level = 0

        @llama_cpp.llama_log_callback
        def collect(level: int, text: bytes, _: ctypes.c_void_p) -> None:
            level = self.level if level == 5 else level  # 5: continues the previous line
            if level in (3, 4):  # ggml_log_level: 3 WARN, 4 ERROR
                self.lines.append(text.decode("utf-8", "replace").rstrip())
            self.level = level

        self.callback = collect  # ctypes calls it: keep a reference
        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))


def load_llamacpp(
    path: Path, n_ctx: int, threads: int, kv_cache: str, log: LlamaLog
) -> tuple[Any, list[str]]:
    """A llama.cpp model keeping logits for every position, and the warnings its load logged.
    Its KV cache is f16 by default whatever the weights: the f32 GGUF's only rounding."""
    import llama_cpp

    kv_type = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[kv_cache]
    start = len(log.lines)
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        type_k=kv_type,
        type_v=kv_type,
        verbose=False,
    )
    return llm, log.lines[start:]


# --- the checks ---------------------------------------------------------------------------------


def check_metadata(llm: Any, model: Llama, tokenizer: TextTokenizer) -> dict[str, Any]:
    """What llama.cpp read back from the GGUF header, against our model and tokenizer."""
    meta = llm.metadata
    return {
        "n_vocab": (llm.n_vocab(), model.cfg.vocab_size),
        "bos/eos": ((llm.token_bos(), llm.token_eos()), (tokenizer.bos_id, tokenizer.eos_id)),
        "rope.freq_base": (float(meta["llama.rope.freq_base"]), model.cfg.rope_theta),
        "rms_eps": (float(meta["llama.attention.layer_norm_rms_epsilon"]), model.cfg.norm_eps),
        "chat_template equal": meta.get("tokenizer.chat_template") == CHAT_TEMPLATE,
    }


def detokenize(llm: Any, ids: list[int]) -> str:
    """Text of ids by llama.cpp's `llama_detokenize` (what its tools use; it may clean spaces)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buf, size, False, False)
        if n >= 0:
            return buf.raw[:n].decode("utf-8", "replace")
        size = -n


def tokenization_rows(llm: Any, tokenizer: TextTokenizer) -> list[dict[str, Any]]:
    """Per prompt: our ids vs llama.cpp's own tokenization of the text, and whether llama.cpp
    decodes our ids back to the text."""
    rows = []
    for name, text in PROMPTS.items():
        ours = [tokenizer.bos_id, *tokenizer.encode(text)]
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        rows.append(
            {
                "prompt": name,
                "ours": len(ours),
                "llama.cpp": len(theirs),
                "same ids": ours == theirs,
                "llama.cpp detokenizes our ids to the text": detokenize(llm, ours[1:]) == text,
                "their pieces": [tokenizer.decode([t]) for t in theirs[1:]],
                "our pieces": [tokenizer.decode([t]) for t in ours[1:]],
            }
        )
    return rows


def tokenization_corpus(
    llm: Any, tokenizer: TextTokenizer, num_docs: int, max_chars: int
) -> list[dict[str, Any]]:
    """The same comparison on the first num_docs documents (cut at max_chars) of each built-in
    corpus, with the first place where the two tokenizations part, if any."""
    rows = []
    for name in ("english", "chinese", "code"):
        docs = [d[:max_chars] for d in itertools.islice(iter_builtin(name), num_docs)]
        same, round_trips, ours_n, theirs_n, example = 0, 0, 0, 0, ""
        for doc, ours in zip(docs, tokenizer.encode_batch(docs), strict=True):
            theirs = llm.tokenize(doc.encode("utf-8"), add_bos=False, special=False)
            same += ours == theirs
            round_trips += detokenize(llm, ours) == doc
            ours_n, theirs_n = ours_n + len(ours), theirs_n + len(theirs)
            if ours != theirs and not example:
                i = agree(ours[: len(theirs)], theirs[: len(ours)])
                example = (
                    f"ours {[tokenizer.decode([t]) for t in ours[i : i + 3]]} vs llama.cpp "
                    f"{[tokenizer.decode([t]) for t in theirs[i : i + 3]]}"
                )
        rows.append(
            {
                "corpus": f"builtin:{name}",
                "documents with the same ids": f"{same}/{len(docs)}",
                "detokenized back exactly": f"{round_trips}/{len(docs)}",
                "our tokens": ours_n,
                "llama.cpp tokens": theirs_n,
                "first difference": example,
            }
        )
    return rows


def compare(
    llm: Any, refs: dict[str, Llama], tokenizer: TextTokenizer, new_tokens: int
) -> list[dict[str, Any]]:
    """Greedy decode of every prompt in llama.cpp and in each lmforge reference model."""
    rows = []
    for name, text in PROMPTS.items():
        ids = [tokenizer.bos_id, *tokenizer.encode(text)]
        theirs, _ = llamacpp_greedy(llm, ids, new_tokens)
        their_logits = np.array(llm.scores[len(ids) - 1 : len(ids) - 1 + new_tokens])
        row: dict[str, Any] = {"prompt": name, "ids": theirs}
        for ref, model in refs.items():
            ours, _ = lmforge_greedy(model, ids, new_tokens)
            our_logits = teacher_forced_logits(model, ids, theirs)
            top2 = np.sort(our_logits, axis=-1)[:, -2:]
            diff = np.abs(our_logits - their_logits)
            row[ref] = {
                "agree": agree(ours, theirs),
                "step1_max_abs_diff": float(diff[0].max()),
                "max_abs_diff": float(diff.max()),
                "min_top2_gap": float((top2[:, 1] - top2[:, 0]).min()),
                "ids": ours,
            }
        rows.append(row)
    return rows


def time_decode(llm: Any, model: Llama, ids: list[int], n: int, repeats: int) -> dict[str, float]:
    """Median decode tokens/s of both engines, taking turns, from the same prompt."""
    theirs, ours = [], []
    for _ in range(repeats):
        theirs.append(llamacpp_greedy(llm, ids, n)[1])
        ours.append(lmforge_greedy(model, ids, n)[1])
    return {"llama.cpp": statistics.median(theirs), "lmforge": statistics.median(ours)}


# --- report -------------------------------------------------------------------------------------


def markdown(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2g}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def print_report(report: dict[str, Any], tokenizer: TextTokenizer) -> None:
    n = report["new_tokens"]
    print(
        f"\n{report['checkpoint']}: {report['params'] / 1e6:.2f}M parameters; llama-cpp-python "
        f"{report['llama_cpp_python']} (KV cache {report['kv_cache']}), torch {report['torch']}, "
        f"{report['threads']} thread(s)\n"
    )
    parity, speed = [], []
    for dtype, entry in report["gguf"].items():
        if "error" in entry:
            parity.append({"gguf": dtype, "prompt": f"load failed: {entry['error']}"})
            continue
        print(f"{dtype}: {entry['bytes']:,} bytes; header (llama.cpp, ours): {entry['metadata']}")
        for line in entry["load_warnings"]:
            print(f"  llama.cpp warning: {line}")
        for r in entry["rows"]:
            ref = r.get("rounded", r["fp32"])
            parity.append(
                {
                    "gguf": dtype,
                    "prompt": r["prompt"],
                    "ids = lmforge fp32": f"{r['fp32']['agree']}/{n}",
                    "ids = lmforge, weights as stored": f"{ref['agree']}/{n}",
                    "step-1 logits max abs diff": ref["step1_max_abs_diff"],
                    f"max abs diff, {n} steps": ref["max_abs_diff"],
                    "min top-1/top-2 gap": ref["min_top2_gap"],
                }
            )
        speed.append(
            {
                "gguf": dtype,
                "llama.cpp decode tok/s": entry["decode"]["llama.cpp"],
                "lmforge decode tok/s": entry["decode"]["lmforge"],
                "ratio": entry["decode"]["llama.cpp"] / entry["decode"]["lmforge"],
                "other CPU": f"{entry['other_cpu']:.0%}",
            }
        )
    print(f"\n{markdown(parity)}\n")
    print(
        "(logit diffs: llama.cpp vs lmforge teacher-forced on llama.cpp's ids; f16/bf16 against"
        " lmforge with the GGUF's rounded weights, f32 against the checkpoint itself)\n"
    )
    for r in report["gguf"].get("f32", {}).get("rows", []):
        print(f"{r['prompt']:>8}: {PROMPTS[r['prompt']]!r} → {tokenizer.decode(r['ids'])!r}")
    if "tokenization" in report:
        pre = report["pre_tokenizer"]
        print(f"\nllama.cpp's own tokenization of the prompt text ({pre}; BOS included):\n")
        print(
            markdown(
                [{k: v for k, v in r.items() if "pieces" not in k} for r in report["tokenization"]]
            )
        )
        for r in report["tokenization"]:
            if not r["same ids"]:
                print(f"  {r['prompt']}: ours      {r['our pieces']}")
                print(f"  {r['prompt']}: llama.cpp {r['their pieces']}")
    if "tokenization_corpus" in report:
        print(
            "\nthe same on the first 200 documents of each built-in corpus (≤ 4,000 chars each):\n"
        )
        print(markdown(report["tokenization_corpus"]))
    if "controls" in report:
        print("\nthe same comparison for deliberately broken f32 exports (f32 KV cache):\n")
        print(markdown(report["controls"]))
    if speed:
        print(f"\ndecode, {report['time_tokens']} tokens, median of {report['repeats']}:\n")
        print(markdown(speed))


def run_controls(
    model: Llama,
    tokenizer: TextTokenizer,
    tokenizer_file: Path,
    context_length: int,
    work: Path,
    n_ctx: int,
    log: LlamaLog,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """The f32 comparison (f32 KV cache, so a right export is exact to ~1e-5) for the export as
    it is and for each broken one: what the match above would look like if a part were wrong."""
    rows = []
    cases: dict[str, contextlib.AbstractContextManager[Any]] = {
        "as exported": contextlib.nullcontext(),
        **broken_exports(),
    }
    for name, patch in cases.items():
        path = work / "control-f32.gguf"
        with patch:
            export_gguf(model, path, tokenizer_file, "f32", context_length)
        llm, _ = load_llamacpp(path, n_ctx, args.threads, "f32", log)
        found = compare(llm, {"fp32": model}, tokenizer, args.new_tokens)
        llm.close()
        rows.append(
            {
                "f32 export": name,
                f"prompts with {args.new_tokens}/{args.new_tokens} ids equal": (
                    f"{sum(r['fp32']['agree'] == args.new_tokens for r in found)}/{len(found)}"
                ),
                "step-1 logits max abs diff": max(r["fp32"]["step1_max_abs_diff"] for r in found),
            }
        )
    return rows


def resolve_checkpoint(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """(checkpoint, tokenizer.json): given, the run dir's latest, or a model trained here."""
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
        run_dir = Path(args.run_dir) if args.run_dir else checkpoint.parent.parent
        return checkpoint, run_dir / "tokenizer.json"
    if args.run_dir:
        latest = latest_checkpoint(Path(args.run_dir) / "checkpoints")
        if latest is None:
            raise SystemExit(f"{args.run_dir}: no checkpoint (run `lmforge demo` first)")
        return latest, Path(args.run_dir) / "tokenizer.json"
    t0 = time.perf_counter()
    checkpoint = train_small_model(work / "run", args.train_tokens)
    print(f"training took {time.perf_counter() - t0:.0f} s")
    return checkpoint, work / "run" / "tokenizer.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", help="use this run's latest checkpoint and tokenizer")
    parser.add_argument("--checkpoint", help="use this checkpoint (tokenizer from its run dir)")
    parser.add_argument("--work-dir", help="keep the trained run and the GGUF files here")
    parser.add_argument("--train-tokens", type=int, default=150_000)
    parser.add_argument("--new-tokens", type=int, default=48, help="greedy tokens per prompt")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--time-tokens", type=int, default=100, help="decode length timed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="for both engines; llama.cpp's OpenMP threads spin, so >1 on a busy VM collapses",
    )
    parser.add_argument("--kv-cache", default="f16", choices=["f16", "f32"], help="llama.cpp's")
    parser.add_argument(
        "--pre-tokenizer", help="write this tokenizer.ggml.pre instead of the exporter's gpt-2"
    )
    parser.add_argument(
        "--no-controls", action="store_true", help="skip the deliberately broken f32 exports"
    )
    parser.add_argument("--json", help="also write every number here")
    args = parser.parse_args()
    import llama_cpp

    log = LlamaLog()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        checkpoint, tokenizer_file = resolve_checkpoint(args, work)
        torch.set_num_threads(args.threads)
        model, recipe = pipeline.load_trained(checkpoint)
        tokenizer = TextTokenizer.load(tokenizer_file)
        timed_ids = [tokenizer.bos_id, *tokenizer.encode(PROMPTS["english"])]
        longest = max(len(tokenizer.encode(p)) + 1 for p in PROMPTS.values())
        n_ctx = max(
            recipe.packing.seq_len, longest + args.new_tokens, len(timed_ids) + args.time_tokens
        )
        report: dict[str, Any] = {
            "checkpoint": str(checkpoint),
            "params": sum(p.numel() for p in model.parameters()),
            "llama_cpp_python": llama_cpp.__version__,
            "torch": torch.__version__,
            "threads": args.threads,
            "kv_cache": args.kv_cache,
            "pre_tokenizer": args.pre_tokenizer or "gpt-2 (the exporter's)",
            "new_tokens": args.new_tokens,
            "time_tokens": args.time_tokens,
            "repeats": args.repeats,
            "gguf": {},
        }
        for dtype in cast(list[GGUFType], args.dtypes.split(",")):
            path = work / f"model-{dtype}.gguf"
            with pre_tokenizer(args.pre_tokenizer):
                export_gguf(model, path, tokenizer_file, dtype, recipe.packing.seq_len)
            try:
                llm, warnings = load_llamacpp(path, n_ctx, args.threads, args.kv_cache, log)
            except Exception as e:  # llama.cpp refuses the file: report it, go on
                report["gguf"][dtype] = {"error": f"{e!r}; log: {log.lines[-3:]}"}
                continue
            refs = {"fp32": model}
            if dtype in TORCH_DTYPES:
                refs["rounded"] = rounded_copy(model, dtype)
            if "tokenization" not in report:
                report["tokenization"] = tokenization_rows(llm, tokenizer)
                report["tokenization_corpus"] = tokenization_corpus(llm, tokenizer, 200, 4000)
            entry = {
                "bytes": path.stat().st_size,
                "load_warnings": warnings,
                "metadata": check_metadata(llm, model, tokenizer),
                "rows": compare(llm, refs, tokenizer, args.new_tokens),
            }
            meter = CpuMeter()
            entry["decode"] = time_decode(llm, model, timed_ids, args.time_tokens, args.repeats)
            entry["other_cpu"] = meter.stop()[0]
            report["gguf"][dtype] = entry
            llm.close()
        if not args.no_controls:
            report["controls"] = run_controls(
                model, tokenizer, tokenizer_file, recipe.packing.seq_len, work, n_ctx, log, args
            )
        print_report(report, tokenizer)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
