"""GGUF export: read back by the gguf reader and by transformers' GGUF loader, whose logits
must equal ours (f32 exactly; f16/bf16 within their rounding), with tokenizer and template."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge import pipeline
from lmforge.data.chat import CHAT_TEMPLATE
from lmforge.data.tokenizer import TextTokenizer
from lmforge.export_gguf import export_gguf, interleave_rope_rows
from lmforge.model.config import ModelConfig
from lmforge.model.llama import Llama
from lmforge.recipe import load_recipe
from tests.conftest import TINY_OVERRIDES


def tiny(tie: bool = False, vocab: int = 512) -> Llama:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=vocab,
        num_layers=2,
        d_model=64,
        num_heads=4,
        num_kv_heads=2,
        d_ff=128,
        rope_theta=20_000.0,
        norm_eps=1e-6,
        tie_embeddings=tie,
    )
    return Llama(cfg).eval()


def test_rope_rows_interleave_per_head() -> None:
    w = torch.arange(8.0)[:, None]  # 2 heads of 4 rows: halves [0,1],[2,3] | [4,5],[6,7]
    assert interleave_rope_rows(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize(
    ("dtype", "tol", "tie", "vocab"),
    [("f32", 0.0, False, 512), ("f16", 2e-3, True, 512), ("bf16", 3e-2, False, 520)],
)
def test_transformers_loads_the_gguf_with_our_logits(
    prepared_run: Path, tmp_path: Path, dtype: str, tol: float, tie: bool, vocab: int
) -> None:
    model = tiny(tie, vocab)
    export_gguf(model, tmp_path / "m.gguf", prepared_run / "tokenizer.json", dtype, 128)  # type: ignore[arg-type]
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32
    ).eval()
    ids = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        ours, logits = model(ids), theirs(ids).logits
    assert (ours - logits).abs().max().item() <= tol
    assert theirs.config.num_key_value_heads == 2 and theirs.config.rms_norm_eps == pytest.approx(
        1e-6
    )


def test_metadata_tokenizer_and_template(prepared_run: Path, tmp_path: Path) -> None:
    path = export_gguf(tiny(), tmp_path / "m.gguf", prepared_run / "tokenizer.json", "f16", 128)
    reader = gguf.GGUFReader(path)

    def value(key: str) -> object:
        return reader.fields[key].contents()

    assert value("general.architecture") == "llama"
    assert value("llama.attention.head_count_kv") == 2
    assert value("llama.feed_forward_length") == 128
    assert value("llama.rope.freq_base") == pytest.approx(20_000.0)
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert value("llama.context_length") == 128
    assert value("tokenizer.ggml.pre") == "qwen2"
    assert value("tokenizer.chat_template") == CHAT_TEMPLATE
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.ffn_down.weight"} <= names
    assert {str(t.tensor_type.name) for t in reader.tensors if t.name.endswith("norm.weight")} == {
        "F32"
    }
    ours = TextTokenizer.load(prepared_run / "tokenizer.json")
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    sample = ours.encode("The river flows, 你好 12 times.\n")
    assert theirs.decode(sample) == ours.decode(sample)
    assert theirs.convert_tokens_to_ids("<|im_end|>") == 4


def test_export_verb_writes_gguf_beside_the_run(prepared_run: Path, tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(prepared_run, run_dir)
    recipe = load_recipe(None, [*TINY_OVERRIDES, f"run_dir={run_dir}", "train.max_tokens=1024"])
    pipeline.pretrain_stage(recipe)
    out = pipeline.export_stage(recipe, fmt="gguf", dtype="f32")
    assert out == run_dir / "model-f32.gguf" and out.stat().st_size > 0
    assert not list(run_dir.glob(".model-*.tmp-*"))
