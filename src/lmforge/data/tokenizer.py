"""Byte-level BPE tokenizer (HF `tokenizers`): training, fixed special tokens, save and load.

Every byte sequence round-trips exactly: no normalizer, a full 256-byte alphabet, ByteLevel decoder.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|pad|>",
    "<|bos|>",
    "<|eos|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
)
"""Special tokens; their ids are their positions here (0..7). Chat tokens are reserved for SFT."""

_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}"
SPLIT_PATTERN = "|".join(
    [
        r"'(?:[sdmt]|ll|ve|re)",  # English contractions
        rf"[{_CJK}]",  # each CJK character alone
        r"\p{N}",  # each digit alone
        rf" ?[^\s\p{{N}}\p{{P}}\p{{S}}{_CJK}]+",  # a word, with its leading space
        r" ?[\p{P}\p{S}]+[\r\n]*",  # a punctuation / operator run
        r"\s*[\r\n]+",  # newlines with the indentation before them
        r"\s+(?!\S)",  # a whitespace run, leaving one space for the next word
        r"\s+",
    ]
)
"""Pre-tokenizer regex: BPE merges never cross these pieces. Unmatched text is kept, not dropped."""


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    """How to train the BPE tokenizer."""

    vocab_size: int = 4096
    """Total vocabulary size, including the 256 byte tokens and the special tokens."""
    min_frequency: int = 2
    """A pair must occur at least this often in the training text to be merged."""
    max_train_bytes: int | None = None
    """Train on at most about this many UTF-8 bytes of text; None uses all of it."""


class TextTokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` with lmforge's special tokens."""

    def __init__(self, backend: Tokenizer, json_text: str | None = None) -> None:
        self.backend = backend
        self._json = json_text if json_text is not None else backend.to_str()
        # Text that happens to spell "<|eos|>" stays text: special ids come only from code.
        backend.encode_special_tokens = True
        for i, token in enumerate(SPECIAL_TOKENS):
            if backend.token_to_id(token) != i:
                raise ValueError(f"special token {token} must have id {i}; retrain the tokenizer")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts in parallel (tokenizers uses all cores)."""
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens decode as their own text."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return SPECIAL_TOKENS.index("<|pad|>")

    @property
    def bos_id(self) -> int:
        return SPECIAL_TOKENS.index("<|bos|>")

    @property
    def eos_id(self) -> int:
        return SPECIAL_TOKENS.index("<|eos|>")

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the tokenizer.json bytes; shards record it to catch mismatches."""
        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write tokenizer.json atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_bytes(self._json.encode("utf-8"))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TextTokenizer:
        """Load a tokenizer.json written by `save` (or by `tokenizers`)."""
        path = Path(path)
        try:
            json_text = path.read_bytes().decode("utf-8")
            return cls(Tokenizer.from_str(json_text), json_text)
        except FileNotFoundError:
            raise ValueError(
                f"{path}: tokenizer file not found; run 'lmforge train-tokenizer'"
            ) from None
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise ValueError(
                f"{path}: not a valid lmforge tokenizer ({e}); re-run 'lmforge train-tokenizer'"
            ) from None


def build_untrained() -> Tokenizer:
    """An empty byte-level BPE tokenizer with lmforge's pre-tokenizer and decoder."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> TextTokenizer:
    """Train byte-level BPE on `texts` (streamed) and return the wrapped tokenizer."""
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if cfg.vocab_size < min_vocab:
        raise ValueError(f"vocab_size={cfg.vocab_size} is too small; use at least {min_vocab}")
    tokenizer = build_untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_limit_bytes(texts, cfg.max_train_bytes), trainer=trainer)
    log.info("trained tokenizer: %d tokens", tokenizer.get_vocab_size(with_added_tokens=True))
    return TextTokenizer(tokenizer)


def _limit_bytes(texts: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    total = 0
    for text in texts:
        yield text
        total += len(text.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            return
