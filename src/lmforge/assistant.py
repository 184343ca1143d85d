"""A loaded chat model: messages or a prompt in, text streamed out as tokens are sampled.

`lmforge chat` and `lmforge serve` share it. It loads one of our checkpoints, a run directory
(its latest checkpoint) or a Hugging Face folder we exported. Text is decoded incrementally: the
whole reply is re-decoded after each token and only the new suffix is emitted, held back while it
ends in an incomplete UTF-8 sequence, so multi-byte characters (Chinese) never arrive split.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from lmforge.checkpoint_dirs import latest_checkpoint
from lmforge.data.chat import IM_END, Message, render, special_id
from lmforge.data.tokenizer import TextTokenizer
from lmforge.export import import_hf
from lmforge.generate import (
    Finished,
    GenerateConfig,
    generate_samples,
    generate_stream,
    stop_text_check,
)
from lmforge.model.llama import Llama


@dataclass
class Reply:
    """What a finished generation came to, for the API's usage and finish_reason."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "length"
    """"stop" (an end token or a stop string) or "length" (max tokens reached)."""


@dataclass
class Assistant:
    model: Llama
    tokenizer: TextTokenizer
    name: str
    context_len: int
    """Longest prompt + reply, in tokens (the trained length for our checkpoints)."""

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> Assistant:
        """From a checkpoint (step_*), a run dir (its latest checkpoint) or an HF folder."""
        from lmforge.pipeline import load_trained  # the pipeline imports every stage

        path = Path(path)
        if (path / "checkpoints").is_dir():
            found = latest_checkpoint(path / "checkpoints")
            if found is None:
                raise FileNotFoundError(f"{path}/checkpoints: no checkpoint yet")
            path = found
        if (path / "trainer.json").is_file():
            model, recipe = load_trained(path)
            run = path.absolute().parent.parent  # RUN/checkpoints/step_* (given relative or not)
            tokenizer = TextTokenizer.load(run / "tokenizer.json")
            name, context = run.name, recipe.packing.seq_len
        elif (path / "config.json").is_file():
            model = import_hf(path).float()
            tokenizer = TextTokenizer.load(path / "tokenizer.json")
            hf_config = json.loads((path / "config.json").read_text())
            name, context = path.name, int(hf_config.get("max_position_embeddings", 4096))
        else:
            raise FileNotFoundError(
                f"{path}: not a checkpoint (trainer.json), run dir (checkpoints/) or Hugging "
                "Face folder (config.json)"
            )
        return cls(model.to(device).eval(), tokenizer, name, context)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (special_id(IM_END), self.tokenizer.eos_id)

    def chat_prompt(self, messages: Sequence[Message]) -> list[int]:
        ids, _ = render(messages, self.tokenizer, add_generation_prompt=True)
        return ids.tolist()

    def text_prompt(self, prompt: str) -> list[int]:
        return [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]

    def stream(
        self,
        prompt_ids: list[int],
        cfg: GenerateConfig,
        reply: Reply,
        stop: Sequence[str] = (),
    ) -> Iterator[str]:
        """Text pieces of the reply as they are sampled; `reply` is filled in as it goes."""
        tokens = generate_stream(self.model, prompt_ids, cfg, self.stop_ids)
        return self.pieces(tokens, reply, stop)

    def complete(
        self, prompt_ids: list[int], cfg: GenerateConfig, n: int, stop: Sequence[str] = ()
    ) -> list[tuple[str, Reply]]:
        """n whole replies to one prompt and what each came to, sampled as one batch
        (`generate_samples`); a sample stops decoding once its text holds a stop string."""
        finished = self.stop_check(stop)
        samples = generate_samples(self.model, prompt_ids, n, cfg, self.stop_ids, finished)
        return self.replies(samples, len(prompt_ids), stop)

    def stop_check(self, stop: Sequence[str]) -> Finished | None:
        """finished(sample, ids) for a decoder, true once the text holds a stop string."""
        return stop_text_check(self.tokenizer, [s for s in stop if s]) if any(stop) else None

    def replies(
        self, samples: list[list[int]], prompt_tokens: int, stop: Sequence[str] = ()
    ) -> list[tuple[str, Reply]]:
        """Each sample's text, cut at stop ids and strings as `stream` cuts one, and what it
        came to."""
        replies = []
        for sample in samples:
            reply = Reply(prompt_tokens=prompt_tokens)
            replies.append(("".join(self.pieces(iter(sample), reply, stop)), reply))
        return replies

    def pieces(self, tokens: Iterator[int], reply: Reply, stop: Sequence[str]) -> Iterator[str]:
        """Text pieces of the reply as tokens arrive, up to a stop id or stop string."""
        ids: list[int] = []
        sent = ""
        for token in tokens:
            if token in self.stop_ids:
                reply.finish_reason = "stop"
                break
            ids.append(token)
            reply.completion_tokens = len(ids)
            text = self.tokenizer.decode(ids)
            cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
            if cut >= 0:
                if cut > len(sent):
                    yield text[len(sent) : cut]
                reply.finish_reason = "stop"
                return
            if text.endswith("\ufffd"):  # the middle of a multi-byte character
                continue
            safe = len(text) - _stop_prefix_at_end(text, stop)  # may yet become a stop string
            if safe > len(sent):
                yield text[len(sent) : safe]
                sent = text[:safe]
        text = self.tokenizer.decode(ids)
        if len(text) > len(sent):
            yield text[len(sent) :]


def _stop_prefix_at_end(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (held back until the
    next tokens complete it or rule it out)."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def chat_loop(
    assistant: Assistant,
    cfg: GenerateConfig,
    system: str | None = None,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = lambda s: print(s, end="", flush=True),
) -> list[Message]:
    """An interactive chat: each reply streamed as it is sampled; `/reset` clears the history,
    `/exit` or end of input ends. The oldest turns are dropped when the history outgrows the
    context. Returns the final history."""
    start = [Message("system", system)] if system else []
    history = list(start)
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return history
        if line.strip() in ("/exit", "/quit"):
            return history
        if line.strip() == "/reset":
            history = list(start)
            write("(history cleared)\n")
            continue
        if not line.strip():
            continue
        trimmed = [*history, Message("user", line)]
        prompt = assistant.chat_prompt(trimmed)
        while len(prompt) + cfg.max_new_tokens > assistant.context_len and len(trimmed) > 1 + len(
            start
        ):
            trimmed = [*start, *trimmed[len(start) + 2 :]]  # drop the oldest exchange
            prompt = assistant.chat_prompt(trimmed)
        room = assistant.context_len - len(prompt)
        if room < 1:  # the history stays as it was: only this message is refused
            write(f"(message too long for the {assistant.context_len}-token context)\n")
            continue
        history = trimmed
        reply = Reply(len(prompt))
        write("assistant> ")
        pieces = []
        for piece in assistant.stream(
            prompt, replace(cfg, max_new_tokens=min(cfg.max_new_tokens, room)), reply
        ):
            write(piece)
            pieces.append(piece)
        write("\n")
        history.append(Message("assistant", "".join(pieces)))
