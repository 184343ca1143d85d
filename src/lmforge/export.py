"""Hugging Face export: write our Llama as a `LlamaForCausalLM` folder, and read such a folder back.

Our submodule names are HF's minus the `model.` prefix and RoPE is half-split like HF's, so the
weights only need a rename. `transformers` is not imported here: it is an optional dependency.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, processors

from lmforge.checkpoint_dirs import as_umask_allows
from lmforge.data.chat import CHAT_TEMPLATE
from lmforge.model.config import ModelConfig
from lmforge.model.llama import Llama

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
"""Keys of `special_tokens` that transformers knows; their ids go into config.json as `<key>_id`."""


def hf_config(
    cfg: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    max_position_embeddings: int = 4096,
    token_ids: dict[str, int] | None = None,
) -> dict[str, Any]:
    """config.json of a `LlamaForCausalLM` with our shape; token_ids e.g. {"bos_token": 1}."""
    d: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        # transformers >= 5 reads rope_parameters; 4.x reads the top-level rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "dtype": _dtype_name(dtype),
        "torch_dtype": _dtype_name(dtype),  # the key before transformers 4.56
        "use_cache": True,
    }
    token_ids = token_ids or {}
    for key in ("bos_token", "eos_token", "pad_token"):  # explicit null: HF's defaults are 1 and 2
        d[f"{key}_id"] = token_ids.get(key)
    return d


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _require(d: dict[str, Any], key: str, source: str) -> Any:
    if key not in d:
        raise ValueError(f"{source}: missing key {key!r}; is this a LlamaForCausalLM config?")
    return d[key]


def _rope_theta(d: dict[str, Any], source: str) -> float:
    """rope_theta from `rope_parameters` (transformers 5) or the top level (4.x); default 10000."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{source}: rope_type {rope_type!r} is not supported; only 'default' RoPE")
    return float(rope.get("rope_theta", d.get("rope_theta", 10_000.0)))


def config_from_hf(d: dict[str, Any], source: str = CONFIG_FILE) -> ModelConfig:
    """Our ModelConfig from an HF Llama config.json dict; source names the file in errors."""
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if d.get(key, want) != want:
            raise ValueError(
                f"{source}: {key}={d[key]!r} is not supported (lmforge needs {want!r})"
            )
    num_heads = int(_require(d, "num_attention_heads", source))
    hidden = int(_require(d, "hidden_size", source))
    if d.get("head_dim") not in (None, hidden // num_heads):
        raise ValueError(f"{source}: head_dim {d['head_dim']} != hidden_size / num_attention_heads")
    return ModelConfig(
        vocab_size=int(_require(d, "vocab_size", source)),
        num_layers=int(_require(d, "num_hidden_layers", source)),
        d_model=hidden,
        num_heads=num_heads,
        num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
        d_ff=int(_require(d, "intermediate_size", source)),
        rope_theta=_rope_theta(d, source),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        init_std=float(d.get("initializer_range", 0.02)),
    )


def hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """Our weights under HF names (`model.` prefix, `lm_head.weight` left out when tied), on CPU."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if model.cfg.tie_embeddings:
                continue
            out[name] = tensor
        else:
            out[f"model.{name}"] = tensor
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def _special_token_ids(tokenizer_file: Path, special_tokens: dict[str, str]) -> dict[str, int]:
    """{"bos_token": id, ...} looked up in tokenizer.json; unknown key or token is an error."""
    tok = Tokenizer.from_file(str(tokenizer_file))
    ids = {}
    for key, token in special_tokens.items():
        if key not in SPECIAL_TOKEN_KEYS:
            raise ValueError(
                f"special_tokens: unknown key {key!r}; use one of {SPECIAL_TOKEN_KEYS}"
            )
        token_id = tok.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"{tokenizer_file}: special token {token!r} ({key}) is not in the vocab"
            )
        ids[key] = token_id
    return ids


def _write_json(path: Path, d: dict[str, Any]) -> None:
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def _write_tokenizer(
    folder: Path,
    tokenizer_file: Path,
    special_tokens: dict[str, str],
    vocab_size: int,
    max_length: int,
) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json for AutoTokenizer.

    With a bos_token, encoding with special tokens prepends it (like Llama tokenizers): the model
    saw BOS at every document start in training, so `tokenizer(text)` gives what it expects.
    """
    tok = Tokenizer.from_file(str(tokenizer_file))
    if tok.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise ValueError(
            f"{tokenizer_file}: {tok.get_vocab_size(with_added_tokens=True)} tokens, more than"
            f" the model's vocab_size {vocab_size}: not the tokenizer it was trained with"
        )
    bos = special_tokens.get("bos_token")
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]
        )
    tok.save(str(folder / "tokenizer.json"))
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": bos is not None,
        "model_max_length": max_length,  # the trained context (transformers' default: 1e30)
        "chat_template": CHAT_TEMPLATE,  # apply_chat_template renders what data/chat.py does
        **special_tokens,
    }
    _write_json(folder / "tokenizer_config.json", tok_config)
    _write_json(folder / "special_tokens_map.json", dict(special_tokens))


def _write_folder(
    model: Llama,
    folder: Path,
    tokenizer_file: Path | None,
    special_tokens: dict[str, str],
    max_position_embeddings: int,
    end_of_turn: str | None,
) -> None:
    token_ids = _special_token_ids(tokenizer_file, special_tokens) if tokenizer_file else {}
    dtype = next(model.parameters()).dtype
    config = hf_config(
        model.cfg, dtype=dtype, max_position_embeddings=max_position_embeddings, token_ids=token_ids
    )
    _write_json(folder / CONFIG_FILE, config)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if end_of_turn is not None and tokenizer_file is not None:  # generate() stops at either
        turn = _special_token_ids(tokenizer_file, {"eos_token": end_of_turn})["eos_token"]
        ends = [config["eos_token_id"], turn]
        generation["eos_token_id"] = [i for i in ends if i is not None]
    _write_json(folder / "generation_config.json", generation)
    save_file(hf_state_dict(model), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    as_umask_allows(folder / WEIGHTS_FILE)
    if tokenizer_file is not None:
        vocab = model.cfg.vocab_size
        _write_tokenizer(folder, tokenizer_file, special_tokens, vocab, max_position_embeddings)


EXPORT_FILES = frozenset(
    {
        CONFIG_FILE,
        "generation_config.json",
        WEIGHTS_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
)
"""What an export writes: a folder holding nothing else (or nothing) may be replaced."""


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace anything but an earlier export: pointed at a run dir or a folder of
    other files by mistake, export would delete them."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a folder (nothing was changed)")
    if out_dir.is_dir():
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES)
        if others:
            raise FileExistsError(
                f"{out_dir}: holds files an export does not write ({', '.join(others[:5])}"
                f"{', ...' if len(others) > 5 else ''}); export to a new or empty folder, or"
                " to an earlier export (nothing was changed)"
            )


def _replace_dir(src: Path, dst: Path) -> None:
    """Move folder src to dst, replacing any old dst; the old one is removed only after the move."""
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    if old.exists():
        shutil.rmtree(old)


def export_hf(
    model: Llama,
    out_dir: Path,
    tokenizer_file: Path | None = None,
    special_tokens: dict[str, str] | None = None,
    *,
    max_position_embeddings: int = 4096,
    end_of_turn: str | None = None,
) -> Path:
    """Write out_dir as an HF LlamaForCausalLM folder, weights in the model's dtype; return it.

    special_tokens, e.g. {"bos_token": "<|bos|>", "eos_token": "<|eos|>"}, needs tokenizer_file;
    end_of_turn (a chat model's "<|im_end|>") is a second eos_token_id for generate().
    Everything is written to a temporary sibling folder first, so out_dir is never half-written;
    out_dir (a symlink: where it points) may be new, empty or an earlier export.
    """
    given, out_dir = Path(out_dir), Path(out_dir).resolve()
    _check_replaceable(out_dir)
    special_tokens = dict(special_tokens or {})
    if special_tokens and tokenizer_file is None:
        raise ValueError(
            "export_hf: special_tokens given without tokenizer_file to look them up in"
        )
    if tokenizer_file is not None and not Path(tokenizer_file).is_file():
        raise FileNotFoundError(f"{tokenizer_file}: tokenizer file not found")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the export is meant to be shared
    try:
        tok_file = Path(tokenizer_file) if tokenizer_file is not None else None
        _write_folder(model, tmp, tok_file, special_tokens, max_position_embeddings, end_of_turn)
        _replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("exported HF LlamaForCausalLM to %s", out_dir)
    return given


def read_hf_config(folder: Path) -> ModelConfig:
    """Our ModelConfig from an HF folder's config.json."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; export the model with export_hf first")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return config_from_hf(d, source=str(path))


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; re-run export_hf (sharded files are unsupported)"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: unreadable safetensors file ({e}); re-run export_hf") from e


def _our_state_dict(
    hf: dict[str, torch.Tensor], model: Llama, path: Path
) -> dict[str, torch.Tensor]:
    """Rename HF tensors to ours and check the names match the model exactly."""
    tied = model.cfg.tie_embeddings
    ours = {
        k.removeprefix("model."): v for k, v in hf.items() if not (tied and k == "lm_head.weight")
    }
    expected = set(model.state_dict())
    if tied:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(ours)), sorted(set(ours) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path}: tensor names do not match config.json; missing {missing}, "
            f"unexpected {unexpected}"
        )
    if tied:
        ours["lm_head.weight"] = ours["embed_tokens.weight"]
    return ours


def import_hf(folder: Path) -> Llama:
    """Our Llama, in eval mode, from an HF folder holding config.json and model.safetensors."""
    folder = Path(folder)
    cfg = read_hf_config(folder)
    weights = _read_weights(folder)
    model = Llama(cfg)
    state = _our_state_dict(weights, model, folder / WEIGHTS_FILE)
    model.to(state["embed_tokens.weight"].dtype)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{folder / WEIGHTS_FILE}: shapes do not match {CONFIG_FILE} ({e})") from e
    return model.eval()
