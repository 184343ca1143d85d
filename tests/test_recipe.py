"""Recipes: YAML and overrides become typed configs; every mistake names the file and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.model.config import PRESETS
from lmforge.recipe import Recipe, RecipeError, load_recipe, recipe_to_dict, save_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_demo_recipe_file_equals_the_embedded_defaults() -> None:
    assert load_recipe(ROOT / "recipes" / "demo.yaml") == Recipe()


def test_saved_recipe_loads_back_equal(tmp_path: Path) -> None:
    recipe = load_recipe(None, ["model.num_layers=3", "packing.document_masking=false"])
    save_recipe(recipe, tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml") == recipe
    assert recipe_to_dict(recipe)["model"]["num_layers"] == 3


def test_dotted_overrides_are_typed() -> None:
    recipe = load_recipe(None, ["optim.lr=3e-4", "train.max_tokens=1000", "eval.max_batches=null"])
    assert recipe.optim.lr == 3e-4 and recipe.train.max_tokens == 1000
    assert recipe.eval.max_batches is None
    assert isinstance(load_recipe(None, ["optim.lr=1"]).optim.lr, float)


def test_model_preset_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("model: {preset: xmodel-lm-1.1b, rope_theta: 500000}\n")
    model = load_recipe(path).model
    assert model.num_kv_heads == PRESETS["xmodel-lm-1.1b"].num_kv_heads == 4
    assert model.rope_theta == 500000.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: {num_heads: four}\n", r"p\.yaml: model\.num_heads: expected int, got 'four'"),
        ("model: {num_hedas: 4}\n", r"p\.yaml: model\.num_hedas: unknown key"),
        ("trian: {}\n", r"p\.yaml: trian: unknown key"),
        (
            "train: {precision: fp8}\n",
            r"train\.precision: expected one of \['auto', 'fp32', 'bf16'\], got 'fp8'",
        ),
        ("data: {sources: [{name: a}]}\n", r"data\.sources\[0\]: .*path"),
        ("model: {num_heads: 3}\n", r"p\.yaml: model: d_model 256 is not divisible"),
        ("packing: {document_masking: 1}\n", r"packing\.document_masking: expected bool"),
        ("- a\n- b\n", r"p\.yaml: a recipe is a mapping"),
        ("model: {preset: gpt9}\n", r"model\.preset: unknown preset 'gpt9'"),
        # values out of range, at load, not at the step that divides by them
        ("packing: {seq_len: 0}\n", r"p\.yaml: packing: seq_len must be > 0, got 0"),
        ("train: {batch_tokens: 0}\n", r"p\.yaml: train: batch_tokens must be > 0"),
        ("train: {save_every_steps: 0}\n", r"train: save_every_steps must be > 0"),
        ("train: {log_every_steps: 0}\n", r"train: log_every_steps must be > 0"),
        ("train: {micro_batch_size: 0}\n", r"train: micro_batch_size must be > 0"),
        ("model: {num_heads: 0}\n", r"p\.yaml: model: num_heads must be > 0"),
        ("model: {num_kv_heads: 0}\n", r"model: num_kv_heads must be > 0"),
        ("optim: {lr: -1}\n", r"optim: lr must be >= 0, got -1"),
        ("optim: {beta2: 1.0}\n", r"optim: beta2 must be in \[0, 1\)"),
        ("schedule: {cosine_min_ratio: 5}\n", r"schedule: cosine_min_ratio must be in \[0, 1\]"),
        ("eval: {batch_size: 0}\n", r"eval: batch_size must be > 0"),
        ("guard: {max_events: 0}\n", r"guard: max_events must be > 0"),
        ("model: {rope_theta: .nan}\n", r"model: rope_theta must be > 0, got nan"),
    ],
)
def test_bad_recipe_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_bad_override_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="expected key.path=value"):
        load_recipe(None, ["model.num_layers"])
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_mixture_in_yaml_is_typed_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "mix.yaml"
    path.write_text(
        "data:\n"
        "  sources:\n"
        "    - {name: en, path: a.jsonl, weight: 3, max_epochs: 2}\n"
        "    - {name: zh, path: b.jsonl, weight: 1}\n"
        "  mixture_stages:\n"
        "    - {from_tokens: 1000, weights: {zh: 3}}\n"
        "  clean: {max_symbol_ratio: 0.1}\n"
        "  on_error: skip\n"
    )
    data = load_recipe(path).data
    assert [(s.weight, s.max_epochs) for s in data.sources] == [(3.0, 2.0), (1.0, None)]
    assert data.mixture_stages[0].weights == {"zh": 3.0}
    assert data.on_error == "skip" and data.clean.max_symbol_ratio == 0.1
    as_override = f"data={json.dumps(recipe_to_dict(Recipe(data=data))['data'])}"
    assert load_recipe(None, [as_override]).data == data  # saved recipes load back equal
    with pytest.raises(RecipeError, match=r"mixture_stages\[0\].weights.zh: expected float"):
        load_recipe(path, ["data.mixture_stages=[{from_tokens: 0, weights: {zh: lots}}]"])
    with pytest.raises(RecipeError, match="unknown sources"):
        load_recipe(path, ["data.mixture_stages=[{from_tokens: 0, weights: {fr: 1}}]"])
    with pytest.raises(RecipeError, match="give every source a weight, or none"):
        load_recipe(path, ["data.sources=[{name: en, path: a, weight: 1}, {name: zh, path: b}]"])
