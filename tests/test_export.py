"""HF export: the folder loads in transformers with the same logits and tokens, and imports back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.export import config_from_hf, export_hf, hf_config, import_hf
from lmforge.model.config import ModelConfig
from lmforge.model.llama import Llama

SPECIALS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
TEXT = "the quick brown fox jumps over the lazy dog; 敏捷的棕色狐狸跳过了懒狗. " * 20


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~300-token byte-level BPE trained in-process on a few sentences."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def tiny_model(tie: bool = False, rope_theta: float = 10_000.0) -> Llama:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=320,
        num_layers=2,
        d_model=64,
        num_heads=4,
        num_kv_heads=2,
        d_ff=96,
        rope_theta=rope_theta,
        tie_embeddings=tie,
        init_std=0.1,
    )
    return Llama(cfg).eval()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_loads_in_transformers_with_same_logits(tmp_path: Path, tie: bool) -> None:
    transformers = pytest.importorskip("transformers")
    model = tiny_model(tie=tie, rope_theta=500_000.0)
    folder = export_hf(model, tmp_path / "hf")
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert set(modes.values()) == {0o666 & ~_umask()}, modes  # weights were 0600
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    assert hf.config.rope_parameters["rope_theta"] == 500_000.0
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_import_hf_gives_identical_state_dict(tmp_path: Path, tie: bool) -> None:
    model = tiny_model(tie=tie, rope_theta=250_000.0)
    back = import_hf(export_hf(model, tmp_path / "hf"))
    assert back.cfg == model.cfg
    assert back.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    if tie:
        assert back.lm_head.weight is back.embed_tokens.weight


def test_exported_tokenizer_loads_with_auto_tokenizer(tmp_path: Path, tokenizer_file: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = export_hf(tiny_model(), tmp_path / "hf", tokenizer_file, SPECIALS)
    ours = Tokenizer.from_file(str(tokenizer_file))
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert isinstance(theirs, transformers.PreTrainedTokenizerFast)
    for key, token in SPECIALS.items():
        assert getattr(theirs, key) == token
        assert getattr(theirs, f"{key}_id") == ours.token_to_id(token)
    text = "the lazy fox, 棕色的狗!"
    bos = ours.token_to_id(SPECIALS["bos_token"])
    assert theirs.encode(text) == [bos, *ours.encode(text).ids]  # BOS first, as in training
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text).ids
    config = json.loads((folder / "config.json").read_text())
    assert config["eos_token_id"] == ours.token_to_id("<|eos|>")
    assert theirs.model_max_length == config["max_position_embeddings"] == 4096
    no_eos = {k: v for k, v in SPECIALS.items() if k != "eos_token"}
    turn = export_hf(tiny_model(), tmp_path / "t", tokenizer_file, no_eos, end_of_turn="<|bos|>")
    generation = json.loads((turn / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ours.token_to_id("<|bos|>")]  # no null in the list
    small = ModelConfig(vocab_size=ours.get_vocab_size() - 1, num_layers=1, d_model=8, d_ff=8)
    with pytest.raises(ValueError, match="more than the model's vocab_size"):
        export_hf(Llama(small), tmp_path / "small", tokenizer_file, SPECIALS)


def test_export_replaces_an_earlier_export_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "hf"
    export_hf(tiny_model(tie=True), out)
    export_hf(tiny_model(), out)  # an earlier export: replaced
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    # a run dir (or any folder of other files) given by mistake is left as it was
    run = tmp_path / "run"
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    (run / "tokenizer.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"run: holds files an export does not write"):
        export_hf(tiny_model(), run)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "tokenizer.json"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is not a folder"):
        export_hf(tiny_model(), tmp_path / "file")
    # a symlink: the export lands where it points, again and again
    (tmp_path / "disk").mkdir()
    (tmp_path / "latest").symlink_to(tmp_path / "disk" / "hf")
    for _ in range(2):
        assert export_hf(tiny_model(), tmp_path / "latest") == tmp_path / "latest"
    assert (tmp_path / "latest").is_symlink() and (tmp_path / "disk/hf/config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["hf"]


def test_hf_config_round_trips() -> None:
    cfg = tiny_model(tie=True, rope_theta=123_456.0).cfg
    assert config_from_hf(hf_config(cfg)) == cfg


def test_unknown_special_token_names_the_tokenizer_file(
    tmp_path: Path, tokenizer_file: Path
) -> None:
    with pytest.raises(ValueError, match="tokenizer.json.*<nope>"):
        export_hf(tiny_model(), tmp_path / "hf", tokenizer_file, {"bos_token": "<nope>"})
    assert not (tmp_path / "hf").exists()


def test_missing_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    folder = export_hf(tiny_model(), tmp_path / "hf")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: not found"):
        import_hf(folder)


def test_truncated_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    folder = export_hf(tiny_model(), tmp_path / "hf")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors: unreadable"):
        import_hf(folder)


def test_wrong_tensor_names_are_listed(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = export_hf(tiny_model(), tmp_path / "hf")
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.extra.weight"] = tensors.pop("model.norm.weight")
    save_file(tensors, str(path))
    with pytest.raises(
        ValueError, match=r"missing \['norm.weight'\].*unexpected \['extra.weight'\]"
    ):
        import_hf(folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
