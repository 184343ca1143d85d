"""Export to GGUF (llama.cpp, ollama, transformers' GGUF loader) with the `gguf` package.

Architecture "llama". Three things decide whether llama.cpp computes what we do:

- Q and K rows are reordered per head from our half-split RoPE layout (rotate_half, as HF) to
  the interleaved pairs llama.cpp rotates: row j of the first half goes to 2j, row j of the
  second half to 2j + 1 (the reverse of the permutation HF applies when converting Meta's
  weights). K uses the KV head count.
- Every hyperparameter is written explicitly: head_count_kv and feed_forward_length are
  required, and a missing rms epsilon or RoPE base would silently fall back to llama.cpp's
  defaults.
- The tokenizer goes in as a byte-level BPE ("gpt2" model) with its merges, special tokens
  marked as control tokens, BOS prepended, and the chat template. The pre-tokenizer is llama.cpp's
  "qwen2" regex, which is ours without the CJK-run class: measured with llama.cpp on the demo
  corpus (benchmarks/RESULTS.md), English and code text tokenize to our ids exactly and 191 of
  200 Chinese documents do (the rest cut a CJK run at our 32-character cap). "gpt-2" split
  newline runs and punctuation before a newline differently (0 of 79 English documents equal)
  and turned on llama.cpp's detokenizer space clean-up. Pass token ids where exact equality
  matters.

Norm weights stay f32 (llama.cpp's convention for 1-D tensors); matrices take the chosen type.
The file is written to a temporary name and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lmforge.data.chat import CHAT_TEMPLATE
from lmforge.data.tokenizer import SPECIAL_TOKENS
from lmforge.model.llama import Llama

GGUFType = Literal["f32", "f16", "bf16"]

TENSOR_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
"""Our (HF Llama) parameter names → GGUF's, per block under `layers.{i}.` / `blk.{i}.`."""


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads·d, in) rows in half-split order → llama.cpp's interleaved pairs, per head."""
    d = weight.shape[0] // heads
    per_head = weight.reshape(heads, 2, d // 2, *weight.shape[1:])  # (h, half, j, in)
    return per_head.transpose(1, 2).reshape(weight.shape)  # row 2j ← j, row 2j+1 ← d/2 + j


def gguf_tensors(model: Llama) -> dict[str, torch.Tensor]:
    """Our weights under GGUF names, Q/K reordered for llama.cpp's RoPE (fp32 copies)."""
    cfg = model.cfg
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # llama.cpp reuses token_embd when output is absent
        tensor = tensor.detach().float().cpu()
        if name.startswith("layers."):
            _, index, local = name.split(".", 2)
            if local == "self_attn.q_proj.weight":
                tensor = interleave_rope_rows(tensor, cfg.num_heads)
            elif local == "self_attn.k_proj.weight":
                tensor = interleave_rope_rows(tensor, cfg.num_kv_heads)
            out[f"blk.{index}.{TENSOR_NAMES[local]}"] = tensor
        else:
            out[TENSOR_NAMES[name]] = tensor
    return out


def export_gguf(
    model: Llama,
    out_file: Path,
    tokenizer_file: Path,
    dtype: GGUFType = "f16",
    context_length: int = 4096,
    name: str = "lmforge",
) -> Path:
    """Write `out_file` (.gguf) holding the model, its tokenizer and chat template."""
    import gguf  # optional: lmforge[gguf]

    cfg = model.cfg
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    }[dtype]
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(name)
        writer.add_file_type(file_type)
        writer.add_context_length(context_length)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.num_layers)
        writer.add_feed_forward_length(cfg.d_ff)
        writer.add_head_count(cfg.num_heads)
        writer.add_head_count_kv(cfg.num_kv_heads)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
        _add_tokenizer(writer, tokenizer_file, cfg.vocab_size)
        for tensor_name, tensor in gguf_tensors(model).items():
            data = tensor.numpy()
            if data.ndim == 1 or dtype == "f32":
                writer.add_tensor(tensor_name, data.astype(np.float32))
            elif dtype == "f16":
                writer.add_tensor(tensor_name, data.astype(np.float16))
            else:
                qtype = gguf.GGMLQuantizationType.BF16
                writer.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out_file)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_file


def _add_tokenizer(writer: object, tokenizer_file: Path, vocab_size: int) -> None:
    import gguf

    w: gguf.GGUFWriter = writer  # type: ignore[assignment]
    spec = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"{tokenizer_file}: {len(vocab)} tokens, the model has {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i] = token
        special = token in SPECIAL_TOKENS or token.startswith("<|reserved_")
        types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(SPECIAL_TOKENS.index("<|bos|>"))
    w.add_eos_token_id(SPECIAL_TOKENS.index("<|eos|>"))
    w.add_pad_token_id(SPECIAL_TOKENS.index("<|pad|>"))
    w.add_eot_token_id(SPECIAL_TOKENS.index("<|im_end|>"))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
