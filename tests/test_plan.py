"""`lmforge plan`: the reports' figures come out of the recipes, and the arithmetic holds."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.llama import Llama
from lmforge.plan import (
    GPUS,
    LOGIT_BYTES,
    activation_bytes,
    activation_bytes_per_token_layer,
    format_plan,
    head_bytes_per_token,
    logit_bytes,
    plan_recipe,
)
from lmforge.recipe import Recipe, load_recipe
from lmforge.train.config import auto_loss_chunk
from lmforge.train.stages import total_tokens

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def recipe(name: str) -> Recipe:
    return load_recipe(RECIPES / f"{name}.yaml")


def test_chuxin_steps_are_5_242_880_tokens_of_1_280_rows_of_4k() -> None:
    plan = plan_recipe(recipe("chuxin-1.6b"), gpus=64)
    pretrain, cooldown, *extension = plan.stages
    for stage in (pretrain, cooldown):
        assert (stage.seq_len, stage.batch_tokens) == (4096, 5_242_880)
        assert stage.sequences_per_step == 1280
        assert stage.grad_accum == 5 and stage.micro_batch_size == 4  # 20 rows per GPU
    # context extension: every stage a longer row and a larger RoPE base (ABF), up to 1M
    lengths = [s.seq_len for s in [cooldown, *extension]]
    thetas = [s.rope_theta for s in [cooldown, *extension]]
    assert lengths == sorted(set(lengths)) and lengths[-1] == 2**20
    assert thetas == sorted(set(thetas))


def test_xgen_budgets_are_800b_at_2k_400b_at_4k_300b_at_8k() -> None:
    stages = recipe("xgen-7b").resolved_stages()
    by_length: dict[int, int] = defaultdict(int)
    for s in stages:
        by_length[s.seq_len] += s.tokens
    budgets = {2048: 800 * 10**9, 4096: 400 * 10**9, 8192: 300 * 10**9}
    assert set(by_length) == set(budgets)
    batch = stages[0].batch_tokens
    for seq_len, budget in budgets.items():  # stages round up to whole steps
        assert 0 <= by_length[seq_len] - budget < 2 * batch
    assert 0 <= total_tokens(stages) - 1_500 * 10**9 < len(stages) * batch
    assert stages[0].warmup_tokens == 375_000_000
    assert stages[-1].mixture and not stages[0].mixture  # the code-heavy second data stage


def test_xmodel_steps_are_840_rows_which_7_gpus_split_and_64_do_not() -> None:
    on_7 = plan_recipe(recipe("xmodel-lm-1.1b"), gpus=7, gpu="h800").stages[0]
    assert on_7.sequences_per_step == 840 and on_7.seq_len == 4096
    assert on_7.grad_accum == 30  # 120 rows per GPU in micro-batches of 4
    assert on_7.tokens >= 2 * 10**12
    on_64 = plan_recipe(recipe("xmodel-lm-1.1b"), gpus=64).stages[0]
    assert on_64.grad_accum is None and "not a multiple" in (on_64.accum_error or "")
    assert any("does not divide" in n for n in on_64.notes)
    assert "does not divide" in format_plan(plan_recipe(recipe("xmodel-lm-1.1b"), gpus=64))


def test_flops_per_token_are_6n_plus_the_attention_term() -> None:
    plan = plan_recipe(recipe("chuxin-1.6b"), gpus=64)
    L, d, f, V = 24, 2048, 5632, 102_400  # the report's shape, counted here by hand
    n = L * (4 * d * d + 3 * d * f + 2 * d) + d + V * d  # blocks, final norm, output head
    for s in plan.stages:
        assert s.flops_per_token == pytest.approx(6 * n + 12 * L * d * s.seq_len)
        assert s.flops == pytest.approx(s.flops_per_token * s.tokens)
    assert plan.flops == pytest.approx(sum(s.flops for s in plan.stages))


def test_time_is_flops_over_gpus_times_peak_times_mfu() -> None:
    r = recipe("xgen-7b")
    plan = plan_recipe(r, gpus=64, gpu="h100", mfu=0.4)
    for s in plan.stages:
        assert s.seconds == pytest.approx(s.flops / (64 * GPUS["h100"].peak_flops * 0.4))
    slower = plan_recipe(r, gpus=64, gpu="h100", mfu=0.2)
    assert slower.seconds == pytest.approx(2 * plan.seconds)
    assert plan_recipe(r, gpus=64, gpu="a100").seconds > plan.seconds


def test_memory_per_gpu_falls_as_gpus_rise() -> None:
    r = recipe("xgen-7b")
    plans = [plan_recipe(r, gpus=g) for g in (2, 8, 64, 512)]
    totals = [p.stages[0].memory.total for p in plans]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)
    # the fp32 state is what FSDP shards: 16 bytes per parameter over the GPUs
    for p in plans:
        assert p.stages[0].memory.states == pytest.approx(16 * p.params / p.gpus)


def test_activation_checkpointing_lowers_activation_memory() -> None:
    r = recipe("chuxin-1.6b")
    none = plan_recipe(r, gpus=64, checkpointing="none")
    every = plan_recipe(dataclasses.replace(r, parallel=dataclasses.replace(
        r.parallel, activation_checkpointing="every", checkpoint_every=2)), gpus=64)  # fmt: skip
    full = plan_recipe(r, gpus=64, checkpointing="full")
    for a, b, c in zip(none.stages, every.stages, full.stages, strict=True):
        assert a.memory.activations > b.memory.activations > c.memory.activations
        assert a.memory.activations_full == c.memory.activations < a.memory.activations_none
    # the 1M stage cannot fit one GPU without checkpointing; the plan says so
    assert any("more than the 80 GB" in n for n in none.stages[-1].notes)


@pytest.mark.parametrize("gpus", [1, 2, 7, 8, 64, 100])
def test_grad_accum_times_micro_seq_gpus_is_the_batch(gpus: int) -> None:
    for path in sorted(RECIPES.glob("*.yaml")):
        for s in plan_recipe(load_recipe(path), gpus=gpus).stages:
            per_pass = s.micro_batch_size * s.seq_len * gpus
            if s.grad_accum is None:
                assert s.batch_tokens % per_pass and s.accum_error
            else:
                assert s.grad_accum * per_pass == s.batch_tokens


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 1), (8, 2), (2, 1)])
@pytest.mark.parametrize(("packed", "autocast"), [(False, False), (True, False), (False, True)])
def test_activation_formula_matches_the_tensors_autograd_saves(
    heads: int, kv_heads: int, packed: bool, autocast: bool
) -> None:
    """Count the bytes autograd keeps for the backward of a tiny bf16 model (parameters aside):
    per token and block they match (12·d + 4·kv + 4·f + 4·H + 8), 10·d more under autocast with
    fp32 weights (one process, DDP). Packed rows on CPU run the split kernel, whose per-document
    outputs are copied once more for o_proj: 2·d more. Outside the blocks: head_bytes_per_token
    per token and the fused loss's fp32 head gradient, which logit_bytes counts."""

    def saved(cfg: ModelConfig, T: int) -> int:
        torch.manual_seed(0)
        model = Llama(cfg) if autocast else Llama(cfg).to(torch.bfloat16)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        weight_sizes = {p.numel() for p in model.parameters()}  # autocast's bf16 weight casts
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            cast = autocast and storage.nbytes() // t.element_size() in weight_sizes
            if storage.data_ptr() not in params and not cast:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        ids = torch.randint(0, cfg.vocab_size, (1, T))
        positions = torch.arange(T).remainder(T // 2).unsqueeze(0) if packed else None
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
        ):
            model(ids, positions=positions, labels=ids)
        return sum(storages.values())

    # several head widths: at 4 heads of 64 the 8·head_dim of per-block RoPE casts (since
    # hoisted out of the blocks) equalled the 2·d of an o_proj copy the formula counted
    shape = dict(vocab_size=64, d_model=256, num_heads=heads, num_kv_heads=kv_heads, d_ff=704)
    one, three = ModelConfig(num_layers=1, **shape), ModelConfig(num_layers=3, **shape)  # type: ignore[arg-type]
    T = 250  # no activation the size of a weight (autocast's weight casts are told by size)
    measured = (saved(three, T) - saved(one, T)) / 2 / T
    split_copy = 2 * one.d_model if packed else 0
    per_layer = activation_bytes_per_token_layer(one, autocast)
    assert measured == pytest.approx(per_layer + split_copy, rel=0.01)
    if not packed:  # outside the blocks: per-token tensors and the fused loss's fp32 head grad
        outside = saved(one, T) - per_layer * T
        head_grad = 4 * one.vocab_size * one.d_model
        counted = 0 if autocast else head_grad  # the head weight's size: left out with the casts
        assert outside == pytest.approx(head_bytes_per_token(one, autocast) * T + counted, rel=0.01)
        assert logit_bytes(one, T, 0) - LOGIT_BYTES * T * one.vocab_size == head_grad
    assert activation_bytes(three, T) > activation_bytes(three, T, "full")


def test_bad_arguments_are_named() -> None:
    r = recipe("xgen-7b-mini")
    with pytest.raises(ValueError, match="--gpus"):
        plan_recipe(r, gpus=0)
    with pytest.raises(ValueError, match="--mfu"):
        plan_recipe(r, gpus=8, mfu=1.5)
    with pytest.raises(ValueError, match="unknown GPU"):
        plan_recipe(r, gpus=8, gpu="tpu")


def test_the_automatic_loss_chunk_is_larger_on_a_gpu() -> None:
    """2^24 logits a chunk on CPU; 2^27 on a GPU, where 32 chunks of the reference step ran at
    0.70x HF eager and 4 at 0.98x (benchmarks/RESULTS.md). The plan models a GPU's."""
    assert auto_loss_chunk(32_000, "cpu") == 524
    assert auto_loss_chunk(32_000, "cuda") == 4_194
    assert auto_loss_chunk(2**30, "cpu") == 1  # at least one token
    chuxin = recipe("chuxin-1.6b")
    stage = plan_recipe(chuxin, gpus=64).stages[0]
    tokens = stage.micro_batch_size * stage.seq_len
    chunk = auto_loss_chunk(chuxin.model.vocab_size, "cuda")
    assert stage.memory.logits == logit_bytes(chuxin.model, tokens, chunk)
