"""Stages up to a trained checkpoint: tokenizer, shards, pretraining, instruction tuning; how
their outputs are read back (checkpoints with their recipes, held-out perplexity); and the views
of their inputs (the tokenizer report, data-inspect).

Stages talk through files in the run directory (`RunPaths`).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint import load_model_weights, read_recipe
from lmforge.checkpoint_dirs import checkpoint_dir, latest_checkpoint, run_dir_of
from lmforge.data.clean import CleanConfig, clean
from lmforge.data.loader import DocumentSet, PackedLoader, split_sources, whole_split
from lmforge.data.longdata import PASSKEY, derived_sources, passkey_length
from lmforge.data.mixture import MixtureSource
from lmforge.data.sft import SFTLoader, load_sft_data
from lmforge.data.sources import DataError, SourceConfig, read_documents
from lmforge.data.tokenize import (
    read_manifest,
    stale_settings,
    tokenize_corpus,
)
from lmforge.data.tokenizer import TextTokenizer, sample_sources, train_tokenizer
from lmforge.dist import rank, resolve_device, world_size
from lmforge.eval.perplexity import evaluate_perplexity
from lmforge.export import import_hf, read_hf_config
from lmforge.model.config import ModelConfig
from lmforge.model.llama import Llama
from lmforge.perf import autocast_dtype
from lmforge.recipe import Recipe, RecipeError, build, recipe_to_dict, save_recipe
from lmforge.train.loop import BatchSource, train
from lmforge.train.parallelize import init_distributed, shutdown_distributed
from lmforge.train.stages import StageConfig, trained_stage

log = logging.getLogger(__name__)


class RunPaths:
    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir)
        self.tokenizer = self.root / "tokenizer.json"
        self.shards = self.root / "shards"
        self.checkpoints = checkpoint_dir(self.root)
        self.metrics = self.root / "metrics.jsonl"
        self.eval = self.root / "eval.json"
        self.export = self.root / "hf"

    def refuse_if_trained(self, change: str) -> None:
        """A run dir with checkpoints keeps the tokenizer, shards and recipe they were trained
        with: `change` is refused before anything is written."""
        if latest_checkpoint(self.checkpoints) is not None:
            raise FileExistsError(
                f"{self.root} holds checkpoints of a trained run, which {change} would not match;"
                " use another run_dir (or continue training with `pretrain --resume`); nothing"
                " was changed"
            )


def train_tokenizer_stage(recipe: Recipe) -> TextTokenizer:
    """BPE on a sample of the cleaned sources, each source's share of bytes as the recipe says."""
    paths = RunPaths(recipe.run_dir)
    paths.refuse_if_trained("a new tokenizer")
    paths.root.mkdir(parents=True, exist_ok=True)
    sources = recipe.data.sources
    # a source weighted 0 may be read by a later stage's mixture: it shapes the vocabulary too
    shares = dict(recipe.tokenizer.source_shares) or {s.name: s.weight or 1.0 for s in sources}
    if set(shares) != {s.name for s in sources}:
        raise RecipeError(
            f"tokenizer.source_shares names {sorted(shares)}; give a share for each of the"
            f" data sources {[s.name for s in sources]}"
        )
    streams = {s.name: source_texts(recipe, s) for s in sources}
    texts = sample_sources(streams, shares, recipe.tokenizer.max_train_bytes)
    tokenizer = train_tokenizer(texts, recipe.tokenizer)
    tokenizer.save(paths.tokenizer)
    log.info("trained tokenizer: %d tokens → %s", tokenizer.vocab_size, paths.tokenizer)
    return tokenizer


def source_texts(recipe: Recipe, source: SourceConfig) -> Iterator[str]:
    """A source's documents as tokenize reads them: bad inputs skipped (and logged, up to
    SHOWN_ERRORS) with `data.on_error: skip`, then cleaned."""
    on_error = None
    if recipe.data.on_error == "skip":
        shown = 0

        def on_error(error: DataError) -> None:
            nonlocal shown
            shown += 1
            if shown <= SHOWN_ERRORS:
                more = "; further bad inputs are not shown" if shown == SHOWN_ERRORS else ""
                log.warning("skipped: %s%s", error, more)

    return cleaned(read_documents(source, on_error=on_error), recipe.data.clean)


SHOWN_ERRORS = 5


def cleaned(texts: Iterator[str], cfg: CleanConfig) -> Iterator[str]:
    """The documents tokenize would keep, normalized the same way (before dedup)."""
    for text in texts:
        cleaned, reason = clean(text, cfg)
        if reason is None:
            yield cleaned


def tokenize_stage(recipe: Recipe) -> dict[str, Any]:
    paths = RunPaths(recipe.run_dir)
    paths.refuse_if_trained("new shards")
    tokenizer = TextTokenizer.load(paths.tokenizer)
    return tokenize_corpus(recipe.data, tokenizer, paths.shards)


def pretrain_stage(recipe: Recipe, resume: bool = False) -> list[dict[str, Any]]:
    paths = RunPaths(recipe.run_dir)
    tokenizer = TextTokenizer.load(paths.tokenizer)
    if recipe.model.vocab_size < tokenizer.vocab_size:
        raise RecipeError(
            f"model.vocab_size {recipe.model.vocab_size} < the tokenizer's "
            f"{tokenizer.vocab_size} tokens ({paths.tokenizer})"
        )
    if not resume:
        paths.refuse_if_trained("a new recipe")
    init_distributed(recipe.parallel)
    if rank() == 0:
        save_recipe(recipe, paths.root / "recipe.yaml")
    torch.manual_seed(recipe.seed)  # the same initial weights on every rank
    model = Llama(recipe.model)
    log.info("model: %.2fM parameters", recipe.model.num_params() / 1e6)
    if recipe.train.init_from is not None:
        load_initial_weights(model, initial_checkpoint(recipe.train.init_from))
    special = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    loader = PackedLoader(
        mixture_sources(recipe, paths.shards, tokenizer),
        recipe.packing,
        recipe.train.micro_batch_size,
        special,
        seed=recipe.seed,
        rank=rank(),
        world_size=world_size(),
        stages=recipe.mixture_stages(),
    )
    val = whole_split(paths.shards, "val", tokenizer.sha256)

    def evaluate(m: Llama, seq_len: int) -> dict[str, float]:
        device = resolve_device(recipe.train.device)
        at_len = replace(recipe, packing=replace(recipe.packing, seq_len=seq_len))
        return perplexity(m, val, at_len, special, device, recipe.eval.max_batches)

    return _train(recipe, model, loader, paths, evaluate, resume)


def sft_stage(recipe: Recipe, resume: bool = False) -> list[dict[str, Any]]:
    """Instruction tuning: the pretraining loop fed with packed chat rows, the loss on assistant
    tokens only, starting from train.init_from (our checkpoint or an HF Llama folder) whose
    architecture and tokenizer it keeps. Without recipe stages, one stage of sft.epochs passes
    (whole steps) with the schedule's warmup and a cosine decay to its floor."""
    paths = RunPaths(recipe.run_dir)
    if recipe.train.init_from is None:
        raise RecipeError("train.init_from: sft starts from a pretrained checkpoint or HF folder")
    if not resume:
        paths.refuse_if_trained("a new recipe and tokenizer")
    base = initial_checkpoint(recipe.train.init_from)
    tokenizer = _adopt_tokenizer(recipe, base, paths)
    recipe = replace(recipe, model=_base_model_config(base))
    lengths = {s.seq_len for s in recipe.resolved_stages()} if recipe.stages else set()
    if lengths - {recipe.packing.seq_len}:
        raise RecipeError(
            f"stages: sft packs conversations into rows of packing.seq_len"
            f" ({recipe.packing.seq_len}) for the whole run; stages ask for {sorted(lengths)}"
        )
    data = load_sft_data(recipe.sft, tokenizer, recipe.packing.seq_len)
    log.info("sft data: %s", json.dumps(data.counts))
    init_distributed(recipe.parallel)
    loader = SFTLoader(
        data.train,
        recipe.packing.seq_len,
        recipe.train.micro_batch_size,
        tokenizer.pad_id,
        recipe.sft.epochs,
        seed=recipe.seed,
        pack=recipe.sft.pack,
        rank=rank(),
        world_size=world_size(),
    )
    if not recipe.stages:
        steps = loader.total_rows * recipe.packing.seq_len // recipe.train.batch_tokens
        if steps == 0:
            raise RecipeError(
                f"sft: {loader.total_rows} rows of {recipe.packing.seq_len} tokens are less than "
                f"one batch of train.batch_tokens={recipe.train.batch_tokens}"
            )
        stage = StageConfig(
            name="sft",
            tokens=steps * recipe.train.batch_tokens,
            warmup_tokens=recipe.schedule.warmup_tokens,
            end_lr=recipe.optim.lr * recipe.schedule.cosine_min_ratio,
        )
        recipe = replace(recipe, stages=(stage,))
    if rank() == 0:
        paths.root.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, paths.root / "recipe.yaml")
        (paths.root / "sft_data.json").write_text(json.dumps(data.counts, indent=2))
    torch.manual_seed(recipe.seed)
    model = Llama(recipe.model)
    load_initial_weights(model, base)
    heldout = data.heldout
    target_ids = [int(t) for c in heldout for t in c.ids[1:][c.mask[1:]]]
    bytes_per_target = len(tokenizer.decode(target_ids).encode()) / max(len(target_ids), 1)

    def evaluate(m: Llama, seq_len: int) -> dict[str, float]:
        if not heldout:
            return {}
        rows = SFTLoader(heldout, seq_len, recipe.eval.batch_size, tokenizer.pad_id, 1.0)
        device = resolve_device(recipe.train.device)
        amp = autocast_dtype(recipe.train.precision, device)
        batches = itertools.islice(rows, recipe.eval.max_batches)
        return evaluate_perplexity(m, batches, device, bytes_per_target, amp)

    return _train(recipe, model, loader, paths, evaluate, resume)


def _train(
    recipe: Recipe,
    model: Llama,
    loader: BatchSource,
    paths: RunPaths,
    evaluate: Callable[[Llama, int], dict[str, float]],
    resume: bool,
) -> list[dict[str, Any]]:
    """The training loop with the recipe's settings (pretraining and SFT alike), then the
    process group, if any, is shut down."""
    try:
        return train(
            model,
            loader,
            recipe.train,
            recipe.optim,
            recipe.resolved_stages(),
            paths.root,
            recipe_to_dict(recipe),
            evaluate,
            recipe.eval.every_steps,
            resume,
            recipe.parallel,
            recipe.guard,
        )
    finally:
        shutdown_distributed()


def _adopt_tokenizer(recipe: Recipe, base: Path, paths: RunPaths) -> TextTokenizer:
    """The base model's tokenizer, copied into the run dir (eval, chat and export read it
    there); a run dir that already has another tokenizer is refused."""
    if recipe.sft.tokenizer is not None:
        source = Path(recipe.sft.tokenizer)
    elif (base / "trainer.json").is_file():  # RUN/checkpoints/step_N
        source = base.parent.parent / "tokenizer.json"
    else:
        source = base / "tokenizer.json"
    tokenizer = TextTokenizer.load(source)
    if paths.tokenizer.exists():
        if TextTokenizer.load(paths.tokenizer).sha256 != tokenizer.sha256:
            raise RecipeError(f"{paths.tokenizer}: another tokenizer than the base's {source}")
    elif rank() == 0:
        paths.root.mkdir(parents=True, exist_ok=True)
        tokenizer.save(paths.tokenizer)
    return tokenizer


def _base_model_config(base: Path) -> ModelConfig:
    """The architecture of train.init_from: the recipe in our checkpoint or the HF config."""
    if (base / "trainer.json").is_file():
        return trained_recipe(base).model
    return read_hf_config(base)


def initial_checkpoint(init_from: str) -> Path:
    """train.init_from as a checkpoint or HF folder: a run dir stands for its latest checkpoint."""
    path = Path(init_from)
    if (path / "checkpoints").is_dir():
        found = latest_checkpoint(path / "checkpoints")
        if found is None:
            raise RecipeError(f"train.init_from: {path}/checkpoints holds no checkpoint")
        return found
    return path


def load_initial_weights(model: Llama, source: Path) -> None:
    """Weights for continual pretraining from one of our checkpoints or an HF Llama folder; the
    architecture must match the recipe's model (the RoPE base may differ)."""
    if (source / "trainer.json").is_file():
        load_model_weights(source, model)
    elif (source / "config.json").is_file():
        imported = import_hf(source)
        try:
            model.load_state_dict(imported.state_dict())
        except RuntimeError as e:
            raise RecipeError(
                f"train.init_from: {source} does not fit the recipe's model: {e}"
            ) from None
    else:
        raise RecipeError(
            f"train.init_from: {source} is neither a checkpoint (trainer.json) nor a Hugging "
            "Face folder (config.json)"
        )
    log.info("initial weights from %s", source)


def mixture_sources(recipe: Recipe, shards: Path, tokenizer: TextTokenizer) -> list[MixtureSource]:
    """The train split of each recipe source, weighted as the recipe says (or by its size:
    its tokens as the stream counts them), and the derived long-context sources a stage names
    (weight 0 until its stage)."""
    found = split_sources(shards, "train", tokenizer.sha256)
    if stale := stale_settings(read_manifest(shards), recipe.data):
        raise RecipeError(
            f"{shards}: written with other data.{', data.'.join(stale)} than the recipe's;"
            " re-run 'lmforge tokenize' (in a new run_dir if this one holds checkpoints)"
        )
    configs = {s.name: s for s in recipe.data.sources}
    if set(found) - set(configs):
        raise RecipeError(
            f"{shards}: holds sources {sorted(found)}, the recipe names {sorted(configs)};"
            " re-run 'lmforge tokenize' after changing data.sources"
        )
    wanted = {n for n, c in configs.items() if c.weight is None or c.weight > 0}
    wanted |= {n for stage in recipe.mixture_stages() for n, w in stage.weights.items() if w > 0}
    if empty := sorted(wanted & set(configs) - set(found)):
        raise RecipeError(
            f"{shards}: no train documents from sources {empty}, which the mixture draws from"
            " (all held out, filtered out or deduplicated); give them more data, a weight of"
            " 0, or drop them from data.sources"
        )
    sources = []
    for name, docs in found.items():
        weight = configs[name].weight
        natural = docs.num_tokens + 2 * docs.num_docs  # as streamed: with BOS and EOS
        sources.append(
            MixtureSource(
                name,
                docs,
                weight=float(natural) if weight is None else weight,
                max_epochs=configs[name].max_epochs,
            )
        )
    named = {name for stage in recipe.mixture_stages() for name in stage.weights}
    ends: frozenset[int] = frozenset()
    if any(passkey_length(n) is not None or n == PASSKEY for n in named):
        from lmforge.eval.needle import sentence_end_ids

        ends = sentence_end_ids(tokenizer)  # passkey needles between sentences, as the test has
    derived = derived_sources(named, found, recipe.long_data, tokenizer.encode, recipe.seed, ends)
    sources += [MixtureSource(name, docs, weight=0.0) for name, docs in derived.items()]
    return sources


def perplexity(
    model: Llama,
    val: DocumentSet,
    recipe: Recipe,
    special: tuple[int, int, int],
    device: torch.device,
    max_batches: int | None,
) -> dict[str, float]:
    """Held-out metrics on the first max_batches (None: all) of the val split, packed as in
    training (masking on or off) unless eval.document_masking says otherwise."""
    packing = recipe.packing
    if recipe.eval.document_masking is not None:
        packing = replace(packing, document_masking=recipe.eval.document_masking)
    loader = PackedLoader(val, packing, recipe.eval.batch_size, special, shuffle=False)
    bytes_per_target = val.num_bytes / (val.num_tokens + val.num_docs)
    amp = autocast_dtype(recipe.train.precision, device)
    return evaluate_perplexity(
        model, itertools.islice(loader, max_batches), device, bytes_per_target, amp
    )


def load_trained(checkpoint: Path) -> tuple[Llama, Recipe]:
    """The model in a checkpoint and its recipe (see trained_recipe)."""
    recipe = trained_recipe(checkpoint)
    model = Llama(recipe.model)
    load_model_weights(checkpoint, model)
    return model.eval(), recipe


def trained_recipe(checkpoint: Path) -> Recipe:
    """The recipe saved with a checkpoint, narrowed to the stage its weights were last trained
    in: that stage's RoPE base and row length, no further stages."""
    saved = build(Recipe, read_recipe(checkpoint), str(checkpoint / "trainer.json"), "")
    tokens = json.loads((checkpoint / "trainer.json").read_text())["tokens"]
    stage = trained_stage(saved.resolved_stages(), tokens)
    return replace(
        saved,
        model=replace(saved.model, rope_theta=stage.rope_theta),
        packing=replace(saved.packing, seq_len=stage.seq_len),
        stages=(),
    )


def find_checkpoint(recipe: Recipe, checkpoint: str | Path | None) -> Path:
    if checkpoint is not None:
        return Path(checkpoint)
    found = latest_checkpoint(RunPaths(recipe.run_dir).checkpoints)
    if found is None:
        raise FileNotFoundError(
            f"{RunPaths(recipe.run_dir).checkpoints}: no checkpoint; "
            "run 'lmforge pretrain' first or pass --checkpoint"
        )
    return found


def checkpoint_tokenizer(recipe: Recipe, checkpoint: Path) -> Path:
    """The tokenizer.json a checkpoint was trained with: its own run dir's (RUN/checkpoints/
    step_*), else the recipe's run dir's (a checkpoint copied elsewhere)."""
    run = run_dir_of(checkpoint)
    if run is not None and RunPaths(run).tokenizer.is_file():
        return RunPaths(run).tokenizer
    return RunPaths(recipe.run_dir).tokenizer
