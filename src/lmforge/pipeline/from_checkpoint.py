"""Stages that start from a trained checkpoint: held-out perplexity, loss by position,
benchmarks, needle in a haystack, samples, and the Hugging Face export.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lmforge.data.loader import split_sources, whole_split
from lmforge.data.tokenizer import TextTokenizer
from lmforge.dist import resolve_device
from lmforge.eval.perplexity import loss_by_position, position_bins
from lmforge.export import export_hf
from lmforge.generate import GenerateConfig, generate_texts
from lmforge.logs import progress
from lmforge.perf import autocast_dtype
from lmforge.pipeline.training import (
    RunPaths,
    checkpoint_tokenizer,
    find_checkpoint,
    load_trained,
    perplexity,
)
from lmforge.recipe import Recipe

log = logging.getLogger(__name__)

EXPORT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def eval_stage(recipe: Recipe, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Perplexity and bits per byte on the whole val split of the recipe's shards."""
    path = find_checkpoint(recipe, checkpoint)
    model, trained = load_trained(path)
    trained = replace(trained, eval=recipe.eval)  # how to evaluate is the caller's choice
    paths = RunPaths(recipe.run_dir)
    tokenizer = TextTokenizer.load(checkpoint_tokenizer(recipe, path))
    special = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    val = whole_split(paths.shards, "val", tokenizer.sha256)
    device = resolve_device(recipe.train.device)
    model.to(device)
    result: dict[str, Any] = {
        "checkpoint": str(path),
        **perplexity(model, val, trained, special, device, max_batches=None),
    }
    for name, part in split_sources(paths.shards, "val", tokenizer.sha256).items():
        metrics = perplexity(model, part, trained, special, device, max_batches=None)
        result[name] = {k.removeprefix("val_"): v for k, v in metrics.items()}
    paths.eval.write_text(json.dumps(result, indent=2))
    return result


def position_stage(
    recipe: Recipe, length: int, max_docs: int = 64, checkpoint: str | Path | None = None
) -> dict[str, Any]:
    """Loss by token position on the val documents of at least `length` tokens, with a PNG."""
    path = find_checkpoint(recipe, checkpoint)
    model, trained = load_trained(path)
    paths = RunPaths(recipe.run_dir)
    tokenizer = TextTokenizer.load(checkpoint_tokenizer(recipe, path))
    val = whole_split(paths.shards, "val", tokenizer.sha256)
    device = resolve_device(recipe.train.device)
    long_docs = (
        torch.from_numpy(val.document(i).astype("int64"))
        for i in range(val.num_docs)
        if len(val.document(i)) >= length
    )
    losses = loss_by_position(
        model.to(device),
        itertools.islice(long_docs, max_docs),
        length,
        tokenizer.bos_id,
        device,
        autocast_dtype(recipe.train.precision, device),
    )
    out = {
        "checkpoint": str(path),
        "train_seq_len": trained.packing.seq_len,
        "bins": position_bins(losses),
        "loss": losses,
    }
    (paths.root / "loss_by_position.json").write_text(json.dumps(out, indent=2))
    plot_loss_by_position(losses, trained.packing.seq_len, paths.root / "loss_by_position.png")
    return out


def plot_loss_by_position(losses: list[float], train_len: int, out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.plot(range(1, len(losses) + 1), losses, lw=1)
    ax.axvline(train_len, color="gray", ls="--", label=f"training length {train_len}")
    ax.set(xscale="log", xlabel="token position", ylabel="loss (nats)", title="Loss by position")
    ax.legend()
    FigureCanvasAgg(fig).print_png(str(out))


def benchmark_stage(
    recipe: Recipe,
    tasks: list[str],
    data_dir: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    checkpoint: str | Path | None = None,
    samples: int = 1,
) -> dict[str, Any]:
    """Benchmarks (`eval --tasks`) on a checkpoint; results in benchmarks.json and .md."""
    from lmforge.eval.suite import SuiteConfig, benchmark_table, check_task_names, run_suite

    check_task_names(tasks)
    path = find_checkpoint(recipe, checkpoint)
    model, trained = load_trained(path)
    tokenizer = TextTokenizer.load(checkpoint_tokenizer(recipe, path))
    device = resolve_device(recipe.train.device)
    cfg = SuiteConfig(
        tasks=tuple(tasks),
        data_dir=str(data_dir) if data_dir is not None else None,
        num_fewshot=num_fewshot,
        limit=limit,
        max_length=trained.packing.seq_len,
        bf16=autocast_dtype(recipe.train.precision, device) is not None,
        samples=samples,
    )
    out = {"checkpoint": str(path), **run_suite(model.to(device), tokenizer, device, cfg)}
    paths = RunPaths(recipe.run_dir)
    (paths.root / "benchmarks.json").write_text(json.dumps(out, indent=2))
    (paths.root / "benchmarks.md").write_text(benchmark_table(out) + "\n")
    return out


def needle_stage(
    recipe: Recipe,
    lengths: list[int] | None,
    depths: list[float] | None = None,
    variant: str = "needle",
    haystack: str | None = None,
    samples: int = 1,
    checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Needle-in-a-haystack grid on a checkpoint → RUN/needle_{variant}.json, .md and .png.

    lengths None: a quarter of the training length up to twice it, doubling, so the heatmap
    shows both retrieval inside the trained context and what happens beyond it.
    """
    from lmforge.eval import needle

    path = find_checkpoint(recipe, checkpoint)
    model, trained = load_trained(path)
    tokenizer = TextTokenizer.load(checkpoint_tokenizer(recipe, path))
    train_len = trained.packing.seq_len
    auto = [train_len // 4, train_len // 2, train_len, 2 * train_len]
    cfg = needle.NeedleConfig(
        lengths=tuple(lengths or auto),
        variant=variant,  # type: ignore[arg-type]  # NeedleConfig checks the value
        haystack=haystack,
        samples=samples,
    )
    if depths:
        cfg = replace(cfg, depths=tuple(depths))
    if lengths is None:  # keep the automatic lengths that leave room for some haystack
        shortest = needle.min_prompt_length(tokenizer, cfg) + 16
        cfg = replace(cfg, lengths=tuple(L for L in auto if L >= shortest) or (2 * shortest,))
    device = resolve_device(recipe.train.device)
    total = len(cfg.lengths) * len(cfg.depths) * cfg.samples
    with progress(total, f"{variant} grid", unit="prompt") as bar:
        result = needle.run_needle(
            model.to(device),
            tokenizer,
            replace(cfg, bf16=autocast_dtype(recipe.train.precision, device) is not None),
            device,
            progress=bar.update,
        )
    out = {"checkpoint": str(path), "train_seq_len": train_len, **result}
    root = RunPaths(recipe.run_dir).root
    (root / f"needle_{variant}.json").write_text(json.dumps(out, indent=2, ensure_ascii=False))
    (root / f"needle_{variant}.md").write_text(needle.markdown_grid(out) + "\n")
    needle.plot_heatmap(out, root / f"needle_{variant}.png", train_len=train_len)
    return out


def generate_stage(
    recipe: Recipe,
    prompts: list[str],
    checkpoint: str | Path | None = None,
    cfg: GenerateConfig | None = None,
) -> list[str]:
    path = find_checkpoint(recipe, checkpoint)
    model, trained = load_trained(path)
    tokenizer = TextTokenizer.load(checkpoint_tokenizer(recipe, path))
    cfg = cfg or recipe.generate
    longest = max((1 + len(tokenizer.encode(p)) for p in prompts), default=0)
    room = trained.packing.seq_len - longest
    if room < 1:
        raise ValueError(
            f"generate: a prompt of {longest} tokens fills the model's trained context of"
            f" {trained.packing.seq_len} tokens ({path})"
        )
    if cfg.max_new_tokens > room:
        log.warning(
            "generate: max_new_tokens %d cut to %d, so the longest prompt (%d tokens) and its"
            " continuation fit the trained context of %d tokens",
            cfg.max_new_tokens,
            room,
            longest,
            trained.packing.seq_len,
        )
        cfg = replace(cfg, max_new_tokens=room)
    model.to(resolve_device(recipe.train.device))
    return generate_texts(model, tokenizer, prompts, 1, cfg)  # prompt i samples with seed + i


def export_stage(
    recipe: Recipe,
    checkpoint: str | Path | None = None,
    out: str | Path | None = None,
    fmt: str = "hf",
    dtype: str | None = None,
) -> Path:
    """A checkpoint as a Hugging Face folder (fmt "hf", RUN/hf) or one GGUF file (fmt "gguf",
    RUN/model-{dtype}.gguf), weights in dtype f32/f16/bf16 (None: f16 for GGUF, the
    checkpoint's f32 for HF)."""
    path = find_checkpoint(recipe, checkpoint)
    model, trained = load_trained(path)
    paths = RunPaths(recipe.run_dir)
    tokenizer_file = checkpoint_tokenizer(recipe, path)
    if fmt == "gguf":
        from lmforge.export_gguf import export_gguf

        dtype = dtype or "f16"
        target = Path(out) if out is not None else paths.root / f"model-{dtype}.gguf"
        return export_gguf(
            model,
            target,
            tokenizer_file,
            dtype,  # type: ignore[arg-type]  # the CLI restricts the choices
            context_length=trained.packing.seq_len,
            name=paths.root.name,
        )
    if dtype is not None:
        model.to(EXPORT_DTYPES[dtype])
    special = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
    target = Path(out) if out is not None else paths.export
    return export_hf(
        model,
        target,
        tokenizer_file=tokenizer_file,
        special_tokens=special,
        max_position_embeddings=trained.packing.seq_len,
        end_of_turn="<|im_end|>",
    )
