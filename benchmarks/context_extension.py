"""Context extension at small scale, a "mini ChuXin": does an ABF stage make a T=256 model
retrieve at T=1024?

    python benchmarks/context_extension.py                 # ~25 min on 2 free CPU cores
    python benchmarks/context_extension.py --no-control    # without the plain-length control

One staged recipe (`--corpus` is real text, read by lmforge's own sources; long files are cut
into documents of about `--doc-bytes` at blank lines so every source has held-out documents):
a BPE tokenizer, then a 2-layer LLaMA pretrained at T=256 on passkey retrieval sequences of
254 tokens and, sharing `--passkey-share`, the `--short-passkeys` lengths (96 and 160: nearer
keys first teach the copy), the rest corpus text; a linear cooldown; and an extension stage at
T=1024 with a larger RoPE base (ABF, Xiong et al. 2023, arXiv:2309.16039) on `passkey_1022`
sequences with any `long_docs` / `concat_docs` / corpus share asked for. The run stops at the
end of the cooldown (`train.stop_at_step`) and resumes, so the "before" checkpoint is kept. The
control resumes the same checkpoint into the same extension stage with the RoPE base unchanged
(length alone). `--from-before RUN` reuses an earlier run's data and "before" checkpoint and
runs only the extensions (to try extension settings without pretraining again).

Why this shape: retrieval must exist at the short length before one can ask whether it
survives extension, and a tiny model learns it only when it is what there is to learn.
Passkeys hide in the original test's repeated filler (`long_data.passkey_haystack: filler`),
each whole in its row (`packing.split_documents: false`), laid out as the test lays its prompts
out (the haystack starts at a sentence, the needle goes between sentences), trained on the
answer alone (`long_data.passkey_loss: answer`). Without the answer-only loss, or over corpus
text, or cut across rows, or with 15% corpus rows beside them, the models tried here
(0.6M-3.2M parameters, up to 8M tokens) learned at best to copy the key 10 tokens back inside
the needle; without the sentence alignment they retrieved in their own format but much less
on the test's. With 20% corpus text in an extension (of full-loss passkeys) retrieval fell to
chance, and answer-only passkey rows carry fewer targets still, so the default extension is
passkeys only: the model is a retrieval model, not a language model, and its loss by position
on text says little.

Each checkpoint is scored on the passkey grid (`pipeline.needle_stage`: exact match of the greedy
key and its teacher-forced log-probability for prompts of 120-1016 tokens, so that prompt and
answer fit rows of 128-1024: a prompt of exactly T puts the answer past every trained position)
and on loss by position at 1024 (`pipeline.position_stage`). Results:
OUT/context_extension.json, OUT/loss_by_position.png, and the per-checkpoint heatmaps
OUT/needle_passkey_{label}.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

CORPUS = "../shared/data/corpus"
DEFAULT_CORPUS = [
    f"{CORPUS}/gutenberg_gitenberg",
    f"{CORPUS}/wikitext2_pytorch_examples",
    f"{CORPUS}/python311_stdlib_code",
]

log = logging.getLogger("context_extension")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", nargs="+", default=DEFAULT_CORPUS, help="files/folders/globs")
    p.add_argument("--out", default="runs/context_extension", help="run directory")
    p.add_argument("--max-bytes", type=int, default=2_500_000, help="per corpus source")
    p.add_argument("--doc-bytes", type=int, default=16_000, help="cut documents to about this")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=192)
    p.add_argument("--short-len", type=int, default=256, help="pretraining row length")
    p.add_argument("--long-len", type=int, default=1024, help="extension row length")
    p.add_argument("--rope-theta", type=float, default=10_000.0)
    p.add_argument("--ext-rope-theta", type=float, default=100_000.0, help="ABF base")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--pretrain-tokens", type=int, default=6_000_000)
    p.add_argument("--cooldown-tokens", type=int, default=400_000)
    p.add_argument("--extend-tokens", type=int, default=2_400_000)
    p.add_argument("--extend-lr", type=float, default=2e-3, help="cosine to a tenth of it")
    p.add_argument("--passkey-share", type=float, default=1.0, help="pretrain and cooldown")
    p.add_argument(
        "--short-passkeys",
        default="96,160",
        help="passkey lengths trained besides T-2 in pretraining, sharing --passkey-share",
    )
    p.add_argument("--extend-passkey-share", type=float, default=1.0)
    p.add_argument(
        "--passkey-haystack",
        choices=["filler", "corpus"],
        default="filler",
        help="what training passkeys hide in (long_data.passkey_haystack)",
    )
    p.add_argument(
        "--passkey-loss",
        choices=["answer", "all"],
        default="answer",
        help="train passkey rows on the answer only, or on every token (long_data.passkey_loss)",
    )
    p.add_argument(
        "--passkey-min-fraction",
        type=float,
        default=1.0,
        help="passkey_N lengths drawn from [fraction x N, N] (long_data.passkey_min_fraction)",
    )
    p.add_argument("--long-docs-share", type=float, default=0.0)
    p.add_argument("--concat-docs-share", type=float, default=0.0)
    p.add_argument(
        "--lengths",
        default="120,248,504,1016",
        help="passkey prompt lengths (prompt + its 6-token answer within 128/256/512/1024)",
    )
    p.add_argument("--depths", default="0,25,50,75,100", help="needle depths, percent")
    p.add_argument("--samples", type=int, default=4, help="passkey prompts per cell")
    p.add_argument("--position-docs", type=int, default=48, help="val documents for the curve")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--parallel-extend",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the ABF and control extensions at once, one thread each",
    )
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument(
        "--from-before",
        metavar="RUN",
        help="an earlier --out of this script with the same pretraining arguments: reuse its"
        " data and its checkpoint at the end of the cooldown, run only the extensions",
    )
    return p.parse_args()


def split_document(text: str, doc_bytes: int) -> list[str]:
    """Consecutive paragraphs joined until each piece holds about doc_bytes."""
    text = text.replace("\r\n", "\n")
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.M)  # Project Gutenberg header/footer
    end = re.search(r"^\*\*\* ?END OF", text, re.M)
    if start and end and start.end() < end.start():
        text = text[start.end() : end.start()]
    if doc_bytes <= 0:
        return [text]
    pieces, current, size = [], [], 0
    for para in re.split(r"\n[ \t]*\n", text):
        current.append(para)
        size += len(para.encode("utf-8")) + 2
        if size >= doc_bytes:
            pieces.append("\n\n".join(current))
            current, size = [], 0
    if current:
        pieces.append("\n\n".join(current))
    return [p for p in pieces if p.strip()]


def prepare_corpus(paths: list[str], out: Path, max_bytes: int, doc_bytes: int) -> list[dict]:
    """Each --corpus path → OUT/corpus/NAME.jsonl of documents of about doc_bytes."""
    from lmforge.data.sources import SourceConfig, read_documents

    out.mkdir(parents=True, exist_ok=True)
    sources = []
    for path in paths:
        name = re.sub(r"\W", "_", Path(path.rstrip("/")).name.split(".")[0])
        target = out / f"{name}.jsonl"
        docs = 0
        with target.open("w", encoding="utf-8") as f:
            for text in read_documents(SourceConfig(name=name, path=path, max_bytes=max_bytes)):
                for piece in split_document(text, doc_bytes):
                    f.write(json.dumps({"text": piece}, ensure_ascii=False) + "\n")
                    docs += 1
        log.info("corpus %s: %d documents → %s", path, docs, target)
        sources.append({"name": name, "path": str(target)})
    return sources


def base_overrides(args: argparse.Namespace, run_dir: Path, sources: list[dict]) -> list[str]:
    settings: dict[str, Any] = {
        "run_dir": str(run_dir),
        "seed": args.seed,
        "data.sources": sources,
        "tokenizer.vocab_size": args.vocab,
        "model.vocab_size": args.vocab,
        "model.num_layers": args.layers,
        "model.d_model": args.d_model,
        "model.num_heads": args.heads,
        "model.num_kv_heads": args.kv_heads,
        "model.d_ff": args.d_ff,
        "model.rope_theta": args.rope_theta,
        "packing.seq_len": args.short_len,
        "packing.split_documents": False,  # each passkey sequence whole in one row
        "optim.lr": args.lr,
        "train.batch_tokens": args.batch_tokens,
        "train.micro_batch_size": args.batch_tokens // args.short_len,
        "train.save_every_steps": 10**9,  # only at stop_at_step and at the end
        "train.keep_last": 4,
        "train.log_every_steps": 50,
        "eval.every_steps": 0,
        "eval.max_batches": 2,
        # off: passkey rows over the filler reach loss ~0.1 while corpus rows stay ~5, so a
        # batch's loss swings with its mix of the two, which the z-score guard reads as spikes
        "guard.enabled": False,
        "long_data.passkey_haystack": args.passkey_haystack,
        "long_data.passkey_loss": args.passkey_loss,
        "long_data.passkey_min_fraction": args.passkey_min_fraction,
        "long_data.min_tokens": args.long_len,
        "long_data.concat_tokens": args.long_len - 2,
    }
    return [f"{key}={json.dumps(value)}" for key, value in settings.items()]


def stages(args: argparse.Namespace, natural: dict[str, int], ext_theta: float) -> list[dict]:
    """pretrain (warmup → cosine) and cooldown at the short length with passkey_{T-2}, then the
    extension at the long length; every source's weight is set in each mixture."""
    lengths = [args.short_len - 2, *(int(x) for x in args.short_passkeys.split(",") if x)]
    short = {f"passkey_{n}": args.passkey_share / len(lengths) for n in lengths}
    total = sum(natural.values())

    def corpus(share: float) -> dict[str, float]:
        return {name: share * n / total for name, n in natural.items()}

    ext_corpus = max(
        0.0, 1 - args.extend_passkey_share - args.long_docs_share - args.concat_docs_share
    )
    return [
        {
            "name": "pretrain",
            "tokens": args.pretrain_tokens,
            "warmup_tokens": min(200_000, args.pretrain_tokens // 10),
            "end_lr": args.lr / 10,
            "mixture": {**corpus(1 - args.passkey_share), **short},
        },
        {"name": "cooldown", "tokens": args.cooldown_tokens, "lr_schedule": "linear"},
        {
            "name": "extend",
            "tokens": args.extend_tokens,
            "seq_len": args.long_len,
            "rope_theta": ext_theta,
            "lr": args.extend_lr,
            "end_lr": args.extend_lr / 10,
            "warmup_tokens": min(8192, args.extend_tokens // 10),
            "mixture": {
                **corpus(ext_corpus),
                "long_docs": args.long_docs_share,
                "concat_docs": args.concat_docs_share,
                **dict.fromkeys(short, 0.0),
                f"passkey_{args.long_len - 2}": args.extend_passkey_share,
            },
        },
    ]


def write_haystack(recipe: Any, out: Path, max_docs: int = 24) -> Path:
    """Held-out documents as text files: a haystack like the training passkeys' (corpus text,
    which the model has not trained on), one file per sample's starting point."""
    from lmforge.data.loader import whole_split
    from lmforge.data.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.load(Path(recipe.run_dir) / "tokenizer.json")
    val = whole_split(Path(recipe.run_dir) / "shards", "val", tokenizer.sha256)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(min(val.num_docs, max_docs)):
        text = tokenizer.decode(val.document(i).tolist())
        (out / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    return out


def evaluate(
    recipe: Any, checkpoint: Path, label: str, haystacks: dict[str, Path | None], args: Any
) -> dict:
    """Passkey grids (one per haystack) and loss by position of one checkpoint; the heatmap
    PNGs renamed by label and haystack."""
    from lmforge import pipeline

    root = Path(recipe.run_dir)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    t0 = time.perf_counter()
    passkey: dict[str, dict] = {}
    for name, haystack in haystacks.items():
        grid = pipeline.needle_stage(
            recipe,
            lengths,
            depths,
            variant="passkey",
            haystack=None if haystack is None else str(haystack),
            samples=args.samples,
            checkpoint=checkpoint,
        )
        slug = re.sub(r"\W", "_", f"{label}_{name}")
        shutil.move(root / "needle_passkey.png", root / f"needle_passkey_{slug}.png")
        passkey[name] = {}
        for j, length in enumerate(grid["lengths"]):
            records = [r for r in grid["records"] if r["length"] == length]
            passkey[name][length] = {
                "exact": sum(r["exact"] for r in records) / len(records),
                "answer_logprob": sum(r["answer_logprob"] for r in records) / len(records),
                "exact_by_depth": [row[j] for row in grid["exact"]],
                "examples": [[r["answer"], r["generated"]] for r in records[:: args.samples]],
            }
    position = pipeline.position_stage(recipe, args.long_len, args.position_docs, checkpoint)
    (root / "loss_by_position.png").unlink()
    losses = position["loss"]
    return {
        "checkpoint": str(checkpoint),
        "rope_theta": grid["rope_theta"],
        "train_seq_len": grid["train_seq_len"],
        "passkey": passkey,
        "loss_by_position": losses,
        "loss_bins": loss_bins(losses, args.short_len),
        "eval_s": time.perf_counter() - t0,
    }


def loss_bins(losses: list[float], short: int) -> dict[str, float]:
    """Mean loss inside the short training length and in each doubling beyond it."""
    bins, start, end = {}, 0, short
    while start < len(losses):
        chunk = losses[start:end]
        bins[f"{start}-{min(end, len(losses))}"] = sum(chunk) / len(chunk)
        start, end = end, 2 * end
    return bins


def plot_curves(results: dict[str, dict], short: int, out: Path) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for label, r in results.items():
        losses = np.asarray(r["loss_by_position"])
        smooth = np.convolve(losses, np.ones(16) / 16, mode="valid")  # 16-position mean
        name = f"{label} (rope_theta {r['rope_theta']:g}, trained at {r['train_seq_len']})"
        ax.plot(np.arange(8, 8 + len(smooth)), smooth, lw=1.2, label=name)
    ax.axvline(short, color="gray", ls="--", lw=1, label=f"pretraining length {short}")
    ax.set(xscale="log", xlabel="token position", ylabel="loss (nats, 16-position mean)")
    ax.set_title("Held-out loss by position at 1024 tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(out))


def print_table(results: dict[str, dict]) -> None:
    labels = list(results)
    first = next(iter(results.values()))
    head = " | ".join(f"{label} exact | {label} log p" for label in labels)
    print(f"\n| haystack | passkey length | {head} |")
    print("|---" * (2 + 2 * len(labels)) + "|")
    for haystack, per_length in first["passkey"].items():
        for length in per_length:
            cells = []
            for label in labels:
                p = results[label]["passkey"][haystack][length]
                cells += [f"{p['exact']:.2f}", f"{p['answer_logprob']:.2f}"]
            print(f"| {haystack} | {length} | " + " | ".join(cells) + " |")
    print(f"\n| loss at positions | {' | '.join(labels)} |")
    print("|---" * (1 + len(labels)) + "|")
    for b in first["loss_bins"]:
        print(f"| {b} | " + " | ".join(f"{results[k]['loss_bins'][b]:.3f}" for k in labels) + " |")


def prepare(args: argparse.Namespace, root: Path) -> tuple[list[str], dict[str, int], int]:
    """Corpus → tokenizer → shards; the recipe overrides shared by every run, and the natural
    size (train tokens) of each source."""
    from lmforge import pipeline
    from lmforge.recipe import load_recipe

    sources = prepare_corpus(args.corpus, root / "corpus", args.max_bytes, args.doc_bytes)
    base = base_overrides(args, root, sources)
    recipe = load_recipe(None, base)
    pipeline.train_tokenizer_stage(recipe)
    manifest = pipeline.tokenize_stage(recipe)
    natural = {name: m["train"]["tokens"] for name, m in manifest["sources"].items()}
    return base, natural, manifest["splits"]["train"]["tokens"]


def reuse(
    args: argparse.Namespace, earlier: Path, root: Path
) -> tuple[list[str], dict[str, int], int]:
    """prepare()'s results from an earlier run of this script: its sources (in their order, so
    the loader state of its checkpoint fits) and its shards."""
    import yaml

    from lmforge.data.tokenize import read_manifest

    sources = yaml.safe_load((earlier / "recipe.yaml").read_text())["data"]["sources"]
    sources = [{"name": s["name"], "path": s["path"]} for s in sources]
    manifest = read_manifest(earlier / "shards")
    natural = {name: m["train"]["tokens"] for name, m in manifest["sources"].items()}
    return base_overrides(args, root, sources), natural, manifest["splits"]["train"]["tokens"]


def copy_start(root: Path, before: Path, target: Path) -> None:
    """A run dir that resumes from `before`: tokenizer, shards, that checkpoint, its metrics."""
    target.mkdir()
    shutil.copy(root / "tokenizer.json", target / "tokenizer.json")
    shutil.copytree(root / "shards", target / "shards")
    shutil.copytree(before, target / "checkpoints" / before.name)
    step = json.loads((before / "trainer.json").read_text())["step"]
    lines = (root / "metrics.jsonl").read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    (target / "metrics.jsonl").write_text("".join(kept))


def extend(recipes: dict[str, Any], parallel: bool) -> dict[str, float]:
    """Resume each recipe's run to its end: one after another, or each in its own process with
    one thread (the 2-core machine then runs both extensions at once). Seconds per run."""
    import subprocess
    import sys

    from lmforge import pipeline
    from lmforge.recipe import save_recipe

    seconds: dict[str, float] = {}
    if not parallel:
        for label, recipe in recipes.items():
            t0 = time.perf_counter()
            pipeline.pretrain_stage(recipe, resume=True)
            seconds[label] = time.perf_counter() - t0
        return seconds
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = {}
    t0 = time.perf_counter()
    for label, recipe in recipes.items():
        path = Path(recipe.run_dir) / "extend_recipe.yaml"
        save_recipe(recipe, path)
        log_file = (Path(recipe.run_dir) / "extend.log").open("w")
        cmd = [sys.executable, __file__, "_resume", str(path)]
        jobs[label] = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    for label, job in jobs.items():
        if job.wait() != 0:
            raise SystemExit(f"extension {label!r} failed; see {recipes[label].run_dir}/extend.log")
        seconds[label] = time.perf_counter() - t0
    return seconds


def median_tok_per_s(run_dir: Path) -> dict[str, float]:
    from lmforge.logs import read_metrics

    rates: dict[str, list[float]] = {}
    for r in read_metrics(run_dir / "metrics.jsonl"):
        rates.setdefault(r["stage"], []).append(r["tok_per_s"])
    return {stage: sorted(v)[len(v) // 2] for stage, v in rates.items()}


def main() -> None:
    import sys

    os.environ.setdefault("LMFORGE_NO_PROGRESS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lmforge import pipeline
    from lmforge.checkpoint_dirs import latest_checkpoint
    from lmforge.logs import setup_logging
    from lmforge.recipe import load_recipe

    setup_logging()
    if sys.argv[1:2] == ["_resume"]:  # a child of extend()
        pipeline.pretrain_stage(load_recipe(sys.argv[2]), resume=True)
        return
    args = parse_args()
    log.addHandler(logging.getLogger("lmforge").handlers[0])
    log.setLevel(logging.INFO)
    root = Path(args.out)
    if root.exists():
        raise SystemExit(f"{root} exists; remove it or pass another --out")
    times: dict[str, float] = {}
    load = {"start": os.getloadavg()}  # the machine is shared: how busy it was
    t0 = start = time.perf_counter()
    if args.from_before:
        base, natural, corpus_tokens = reuse(args, Path(args.from_before), root)
    else:
        base, natural, corpus_tokens = prepare(args, root)
    times["data_s"] = time.perf_counter() - t0

    def staged(run_dir: Path, theta: float, *extra: str) -> Any:
        plan = json.dumps(stages(args, natural, theta))
        return load_recipe(None, [*base, f"run_dir={run_dir}", f"stages={plan}", *extra])

    runs = {"ABF": staged(root, args.ext_rope_theta)}
    resolved = runs["ABF"].resolved_stages()
    before_step = resolved[0].steps + resolved[1].steps
    t0 = time.perf_counter()
    if args.from_before:
        earlier = Path(args.from_before)
        copy_start(earlier, earlier / "checkpoints" / f"step_{before_step:08d}", root)
    else:
        pipeline.pretrain_stage(
            staged(root, args.ext_rope_theta, f"train.stop_at_step={before_step}")
        )
    times["pretrain_s"] = time.perf_counter() - t0
    before = latest_checkpoint(root / "checkpoints")
    assert before is not None
    if args.control:
        copy_start(root, before, root / "control")
        runs["length only"] = staged(root / "control", args.rope_theta)
    times |= {f"extend_{k}_s": v for k, v in extend(runs, args.parallel_extend).items()}
    checkpoints = {"before": (runs["ABF"], before)}
    for label, recipe in runs.items():
        checkpoints[label] = (recipe, latest_checkpoint(Path(recipe.run_dir) / "checkpoints"))
    haystacks = {"filler": None, "held-out text": write_haystack(runs["ABF"], root / "haystack")}
    results = {}
    for label, (recipe, ckpt) in checkpoints.items():
        results[label] = evaluate(recipe, ckpt, label, haystacks, args)
    times["eval_s"] = sum(r["eval_s"] for r in results.values())
    plot_curves(results, args.short_len, root / "loss_by_position.png")
    times["total_s"] = time.perf_counter() - start
    summary = {
        "command": " ".join(sys.argv),
        "args": vars(args),
        "params_M": runs["ABF"].model.num_params() / 1e6,
        "corpus_train_tokens": corpus_tokens,
        "stages": [
            {k: getattr(s, k) for k in ("name", "steps", "tokens", "seq_len", "rope_theta")}
            | {"mixture": s.mixture}
            for s in resolved
        ],
        "median_tok_per_s": {k: median_tok_per_s(Path(r.run_dir)) for k, r in runs.items()},
        "times_s": times,
        "load_average": load | {"end": os.getloadavg()},
        "results": results,
    }
    (root / "context_extension.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("params_M", "median_tok_per_s", "times_s")}))
    print_table(results)


if __name__ == "__main__":
    main()
