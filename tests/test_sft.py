"""`lmforge sft`: a tiny pretrained model instruction-tuned on chat data learns the template
(held-out assistant loss falls, greedy answers end with <|im_end|>), from our checkpoint or an
HF folder, and resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmforge import pipeline
from lmforge.checkpoint_dirs import latest_checkpoint
from lmforge.data.chat import IM_END, Message, render, special_id
from lmforge.data.tokenizer import SPECIAL_TOKENS, TextTokenizer
from lmforge.generate import GenerateConfig, generate
from lmforge.logs import read_metrics
from lmforge.recipe import RecipeError, load_recipe
from tests.conftest import TINY_OVERRIDES

COLOURS = ["red", "green", "blue", "black", "white", "pink", "grey", "brown"]


def chat_data(path: Path, n: int = 400) -> Path:
    """Questions whose answer is the colour named in them: learnable in a few dozen steps."""
    with path.open("w") as f:
        for i in range(n):
            colour = COLOURS[i % len(COLOURS)]
            record = {
                "instruction": f"Item {i} is {colour}. What colour is item {i}?",
                "output": f"It is {colour}.",
            }
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def base(prepared_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("sft") / "base"
    shutil.copytree(prepared_run, run_dir)
    recipe = load_recipe(None, [*TINY_OVERRIDES, f"run_dir={run_dir}", "train.precision=fp32"])
    pipeline.pretrain_stage(recipe)
    last = latest_checkpoint(run_dir / "checkpoints")
    assert last is not None
    return last


def sft_overrides(run_dir: Path, init: Path, data: Path, epochs: int = 2) -> list[str]:
    return [
        *TINY_OVERRIDES,
        f"run_dir={run_dir}",
        f"train.init_from={init}",
        f"sft.paths=[{data}]",
        f"sft.epochs={epochs}",
        "sft.heldout_fraction=0.1",
        "train.precision=fp32",
        "packing.seq_len=128",
        "train.micro_batch_size=4",
        "train.batch_tokens=1024",
        "optim.lr=0.003",
        "schedule.warmup_tokens=2048",
        "eval.every_steps=10",
        "eval.max_batches=4",
    ]


def test_sft_learns_the_template(base: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "inst"
    recipe = load_recipe(None, sft_overrides(run_dir, base, chat_data(tmp_path / "chat.jsonl")))
    records = pipeline.sft_stage(recipe)
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(evals) >= 2 and evals[-1] < 0.5 * evals[0]
    counts = json.loads((run_dir / "sft_data.json").read_text())
    assert counts["records"] == 400 and counts["heldout"] > 10
    assert records[-1]["stage"] == "sft"

    model, _ = pipeline.load_trained(latest_checkpoint(run_dir / "checkpoints"))  # type: ignore[arg-type]
    tokenizer = TextTokenizer.load(run_dir / "tokenizer.json")
    end = special_id(IM_END)
    for i in (1001, 1002):
        colour = COLOURS[i % len(COLOURS)]
        question = f"Item {i} is {colour}. What colour is item {i}?"
        prompt, _ = render([Message("user", question)], tokenizer, add_generation_prompt=True)
        out = generate(
            model, prompt.tolist(), GenerateConfig(temperature=0, max_new_tokens=12), [end]
        )
        assert out[-1] == end  # the turn ends itself
        assert tokenizer.decode(out[:-1]).strip().startswith("It is")


def test_sft_from_an_hf_folder_and_resume(base: Path, tmp_path: Path) -> None:
    data = chat_data(tmp_path / "chat.jsonl", n=160)
    base_recipe = load_recipe(None, [*TINY_OVERRIDES, f"run_dir={base.parent.parent}"])
    hf = pipeline.export_stage(base_recipe, checkpoint=base, out=tmp_path / "export")
    from transformers import GenerationConfig

    ends = [SPECIAL_TOKENS.index("<|eos|>"), SPECIAL_TOKENS.index("<|im_end|>")]
    assert GenerationConfig.from_pretrained(hf).eos_token_id == ends  # a turn's end stops too
    straight, split = tmp_path / "straight", tmp_path / "split"
    pipeline.sft_stage(load_recipe(None, sft_overrides(straight, hf, data, 1)))
    pipeline.sft_stage(
        load_recipe(None, [*sft_overrides(split, hf, data, 1), "train.stop_at_step=3"])
    )
    pipeline.sft_stage(load_recipe(None, sft_overrides(split, hf, data, 1)), resume=True)
    keys = ("step", "tokens", "loss", "lr", "grad_norm")
    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(split / "metrics.jsonl")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    with pytest.raises(RecipeError, match="train.init_from"):
        pipeline.sft_stage(load_recipe(None, [*TINY_OVERRIDES, f"run_dir={tmp_path / 'x'}"]))
    stages = "stages=[{name: a, tokens: 2048}, {name: b, tokens: 2048, seq_len: 64}]"
    longer = load_recipe(None, [*sft_overrides(tmp_path / "y", hf, data, 1), stages])
    with pytest.raises(RecipeError, match=r"rows of packing.seq_len \(128\).*\[64, 128\]"):
        pipeline.sft_stage(longer)
