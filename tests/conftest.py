"""Shared fixtures: tiny model configs and a tiny run directory built in-process (no downloads)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.llama import Llama

os.environ.setdefault("LMFORGE_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_OVERRIDES = [
    "data.sources=[{name: english, path: 'builtin:english', max_bytes: 20000},"
    " {name: chinese, path: 'builtin:chinese', max_bytes: 20000},"
    " {name: code, path: 'builtin:code', max_bytes: 20000}]",
    "data.heldout_fraction=0.3",
    "data.workers=1",
    "tokenizer.vocab_size=512",
    "model.vocab_size=512",
    "model.num_layers=2",
    "model.d_model=64",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.d_ff=128",
    "packing.seq_len=64",
    "train.micro_batch_size=4",
    "train.batch_tokens=512",
    "train.max_tokens=8192",
    "train.save_every_steps=8",
    "schedule.warmup_tokens=1024",
    "schedule.cooldown_tokens=2048",
    "eval.every_steps=8",
    "eval.max_batches=2",
    "generate.max_new_tokens=8",
]
"""Overrides that shrink the demo recipe to a few seconds on 2 CPU cores."""


@pytest.fixture(scope="module")
def decoder() -> Llama:
    """A tiny untrained Llama in eval mode whose logits are sharp enough (init_std 0.2) that
    greedy ids rarely tie; the decoding tests compare one decoding path with another on it."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, d_ff=96, init_std=0.2
    )
    return Llama(cfg).eval()


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(
        vocab_size=97, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, d_ff=96
    )


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir with a trained tiny tokenizer and shards of the built-in corpora (shared)."""
    from lmforge import pipeline
    from lmforge.recipe import load_recipe

    run_dir = tmp_path_factory.mktemp("prepared") / "run"
    recipe = load_recipe(None, [*TINY_OVERRIDES, f"run_dir={run_dir}"])
    pipeline.train_tokenizer_stage(recipe)
    pipeline.tokenize_stage(recipe)
    return run_dir


@pytest.fixture
def tiny_run(prepared_run: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared run dir (tokenizer + shards, no checkpoints)."""
    run_dir = tmp_path / "run"
    shutil.copytree(prepared_run, run_dir)
    return run_dir
