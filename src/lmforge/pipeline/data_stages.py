"""Stages that look at a run's data rather than train on it: the tokenizer's compression on
held-out text (`tokenizer-report`) and the mixture and packed rows (`data-inspect`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.checkpoint_dirs import latest_checkpoint
from lmforge.data.loader import PackedLoader
from lmforge.data.overview import decode_rows, planned_mixture, realised_mixture, target_shares
from lmforge.data.sources import SourceConfig
from lmforge.data.tokenize import SPLITS, read_manifest, split_of
from lmforge.data.tokenizer import TextTokenizer
from lmforge.data.tokenizer_report import Encoder, load_reference, write_report
from lmforge.pipeline.training import RunPaths, mixture_sources, source_texts
from lmforge.recipe import Recipe
from lmforge.train.stages import total_tokens


def tokenizer_report_stage(
    recipe: Recipe, references: list[str], max_bytes_per_source: int = 300_000
) -> dict[str, Any]:
    """Compression of the run's tokenizer (and references) on each source's held-out documents.

    Held-out (val-split) documents are text the tokenizer was still trained on, but never text
    that a reference tokenizer can have memorized less well than ours: the comparison is fair.
    """
    paths = RunPaths(recipe.run_dir)
    ours = TextTokenizer.load(paths.tokenizer)
    encoders: dict[str, Encoder] = {"lmforge": ours.encode}
    for ref in references:
        name, encode = load_reference(ref)
        encoders[name if name not in encoders else ref] = encode
    fraction = _heldout_fraction(recipe, paths.shards)
    texts = {
        s.name: _heldout_sample(recipe, s, fraction, max_bytes_per_source)
        for s in recipe.data.sources
    }
    return write_report(encoders, texts, paths.root / "tokenizer_report")


def _heldout_fraction(recipe: Recipe, shards: Path) -> float:
    """The fraction the shards were split with, once tokenized (the recipe may have changed
    since); before, the recipe's, which tokenize will use."""
    if not (shards / "manifest.json").exists():
        return recipe.data.heldout_fraction
    return float(read_manifest(shards).get("heldout_fraction", recipe.data.heldout_fraction))


def _heldout_sample(
    recipe: Recipe, source: SourceConfig, fraction: float, max_bytes: int
) -> list[str]:
    """Up to max_bytes of the source's val-split documents (its first document if it has none)."""
    held: list[str] = []
    first: list[str] = []
    size = 0
    for text in source_texts(recipe, source):
        first = first or [text]
        if split_of(text, fraction) == "val":
            held.append(text)
            size += len(text.encode("utf-8"))
            if size >= max_bytes:
                break
    return held or first


def inspect_stage(recipe: Recipe, num_rows: int = 2) -> dict[str, Any]:
    """Per-source counts from the manifest, target / planned / realised shares, sample rows."""
    paths = RunPaths(recipe.run_dir)
    tokenizer = TextTokenizer.load(paths.tokenizer)
    manifest = read_manifest(paths.shards)
    sources = mixture_sources(recipe, paths.shards, tokenizer)
    result: dict[str, Any] = {
        "sources": {
            name: {k: m[k] for k in ("read", "dropped")}
            | {f"{split}_{k}": m[split][k] for split in SPLITS for k in ("docs", "tokens")}
            for name, m in manifest["sources"].items()
        },
        "target_share": target_shares(sources),
        "planned": planned_mixture(
            sources, recipe.mixture_stages(), recipe.seed, total_tokens(recipe.resolved_stages())
        ),
    }
    last = latest_checkpoint(paths.checkpoints)
    if last is not None:
        trainer = json.loads((last / "trainer.json").read_text())
        result["realised"] = realised_mixture(trainer["loader"]["consumed"])
        result["realised_at"] = {"checkpoint": str(last), "tokens": trainer["tokens"]}
    if num_rows < 1:
        result["rows"] = []
        return result
    special = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    loader = PackedLoader(
        sources,
        recipe.packing,
        num_rows,
        special,
        seed=recipe.seed,
        stages=recipe.mixture_stages(),
    )
    result["rows"] = decode_rows(next(iter(loader)), tokenizer, num_rows)
    return result
