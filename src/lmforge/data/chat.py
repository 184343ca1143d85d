"""Chat data: the instruction formats in use, one chat template, and rendering with a loss mask.

Every record becomes a list of messages (role, content) whatever its format:

- `messages`: [{"role", "content"}, ...] (OpenAI style);
- `conversations`: [{"from", "value"}, ...] (ShareGPT, WizardLM; from human/gpt/system);
- Alpaca: "instruction", optional "input", "output", optional "system", and OASST-style
  "history" [[user, assistant], ...] of earlier turns (Dolly's "context"/"response" too);
- prompt/completion pairs: "prompt" with "completion", "response" or "answer".

The template is ChatML over the tokenizer's own special tokens:
`<|bos|><|im_start|>{role}\\n{content}<|im_end|>\\n...`; a prompt for generation ends with
`<|im_start|>assistant\\n`. Its Jinja form (CHAT_TEMPLATE) is written into exported tokenizers so
`apply_chat_template` in transformers gives the same ids. Rendering builds ids piece by piece
(special ids from code, text through the tokenizer), so a message can never forge a special
token, and marks the tokens the loss is taken on: each assistant message's content and the
`<|im_end|>` that closes it, which teaches the model to end its turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmforge.data.tokenizer import SPECIAL_TOKENS, TextTokenizer
from lmforge.jsonl import json_lines

Role = Literal["system", "user", "assistant"]

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The template as Jinja, for tokenizer_config.json (transformers' apply_chat_template)."""

ROLE_NAMES: dict[str, Role] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}
"""Speaker names of the common formats → our roles."""


class ChatFormatError(ValueError):
    """A record that fits no chat format; the message names file and line."""


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


def to_messages(record: Any, where: str) -> list[Message]:
    """The conversation in `record`, in any supported format; `where` is "file:line"."""
    if not isinstance(record, dict):
        raise ChatFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        turns = [_turn(m, "role", "content", where) for m in _list(record, "messages", where)]
    elif "conversations" in record:
        turns = [_turn(m, "from", "value", where) for m in _list(record, "conversations", where)]
    elif "instruction" in record and ("output" in record or "response" in record):
        turns = _alpaca(record, where)
    elif "prompt" in record:
        answer = next((k for k in ("completion", "response", "answer") if k in record), None)
        if answer is None:
            raise ChatFormatError(f"{where}: 'prompt' without 'completion'/'response'/'answer'")
        turns = [Message("user", _text(record, "prompt", where))]
        turns.append(Message("assistant", _text(record, answer, where)))
    else:
        raise ChatFormatError(
            f"{where}: no chat format fits keys {sorted(record)}; expected 'messages', "
            "'conversations', 'instruction'+'output' (Alpaca) or 'prompt'+'completion'"
        )
    check_conversation(turns, where)
    return turns


def check_conversation(turns: Sequence[Message], where: str) -> None:
    """At least one assistant message, and the system message (if any) first."""
    if not any(m.role == "assistant" for m in turns):
        raise ChatFormatError(f"{where}: no assistant message: nothing to learn from")
    if any(m.role == "system" for m in turns[1:]):
        raise ChatFormatError(f"{where}: a system message may only come first")


def _alpaca(record: dict[str, Any], where: str) -> list[Message]:
    turns = []
    if record.get("system"):
        turns.append(Message("system", _text(record, "system", where)))
    for i, pair in enumerate(record.get("history") or []):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise ChatFormatError(f"{where}: history[{i}] must be a [user, assistant] pair")
        if not all(isinstance(x, str) for x in pair):
            raise ChatFormatError(f"{where}: history[{i}] must hold two strings")
        turns += [Message("user", pair[0]), Message("assistant", pair[1])]
    prompt = _text(record, "instruction", where)
    extra = record.get("input") or record.get("context") or ""
    if not isinstance(extra, str):
        raise ChatFormatError(f"{where}: 'input' must be a string")
    turns.append(Message("user", f"{prompt}\n\n{extra}" if extra else prompt))
    answer = "output" if "output" in record else "response"
    turns.append(Message("assistant", _text(record, answer, where)))
    return turns


def _list(record: dict[str, Any], key: str, where: str) -> list[Any]:
    value = record[key]
    if not isinstance(value, list) or not value:
        raise ChatFormatError(f"{where}: '{key}' must be a non-empty list")
    return value


def _turn(item: Any, role_key: str, text_key: str, where: str) -> Message:
    if not isinstance(item, dict) or role_key not in item or text_key not in item:
        raise ChatFormatError(f"{where}: each turn needs '{role_key}' and '{text_key}'")
    role = ROLE_NAMES.get(str(item[role_key]).lower())
    if role is None:
        raise ChatFormatError(
            f"{where}: unknown speaker {item[role_key]!r}; expected one of {sorted(ROLE_NAMES)}"
        )
    return Message(role, _text(item, text_key, where))


def _text(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise ChatFormatError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def render(
    messages: Sequence[Message], tokenizer: TextTokenizer, add_generation_prompt: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the conversation in the template and a bool mask of the tokens the loss is
    taken on (assistant contents and their closing <|im_end|>)."""
    start, end = special_id(IM_START), special_id(IM_END)
    ids, mask = [tokenizer.bos_id], [False]

    def add(tokens: list[int], learn: bool) -> None:
        ids.extend(tokens)
        mask.extend([learn] * len(tokens))

    newline = tokenizer.encode("\n")
    for m in messages:
        # role and content as one text, as the template's output is tokenized: the
        # pre-tokenizer joins the role's newline with whitespace that starts the content
        head = m.role + "\n"
        encoding = tokenizer.backend.encode(head + m.content, add_special_tokens=False)
        in_head = sum(1 for begin, _ in encoding.offsets if begin < len(head))
        add([start, *encoding.ids[:in_head]], False)
        add([*encoding.ids[in_head:], end], m.role == "assistant")
        add(newline, False)
    if add_generation_prompt:
        add([start, *tokenizer.encode("assistant\n")], False)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)


def special_id(token: str) -> int:
    return SPECIAL_TOKENS.index(token)


def read_chat_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """("file:line" or "file[i]", record) from a .json list, .jsonl or .parquet file, or a
    Hugging Face dataset (`hf:NAME[:split]`, needs the `datasets` package)."""
    text = str(path)
    if text.startswith("hf:"):
        yield from _hf_records(text)
        return
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such chat data file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # optional: lmforge[data]

        for i, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}[{i}]", record
    elif path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is no error
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ChatFormatError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(records, list):
            raise ChatFormatError(f"{path}: expected a JSON list of records")
        for i, record in enumerate(records):
            yield f"{path}[{i}]", record
    else:
        with path.open("rb") as f:
            for line_no, record in json_lines(f, path, ChatFormatError):
                yield f"{path}:{line_no}", record


def _hf_records(spec: str) -> Iterator[tuple[str, Any]]:
    import datasets  # optional: lmforge[hf]

    name, _, split = spec.removeprefix("hf:").partition(":")
    for i, record in enumerate(datasets.load_dataset(name, split=split or "train")):
        yield f"{spec}[{i}]", record
