"""Byte-level BPE tokenizer (HF `tokenizers`): training, fixed special tokens, save and load.

Every byte sequence round-trips exactly: no normalizer, a full 256-byte alphabet, ByteLevel decoder,
so no text is ever unknown (byte fallback is built in). `sample_sources` balances the training text
across sources (e.g. Chinese and English, as Xmodel-LM does for its 32,000-token tokenizer).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

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

RESERVED_TOKEN = "<|reserved_{}|>"
"""Padding tokens appended after training (`pad_to_multiple_of`); never produced from text."""

VOCAB_PRESETS: dict[str, int] = {"xmodel-lm": 32000, "xgen": 51200, "chuxin": 102400}
"""Vocabulary sizes of the reports we reproduce: Xmodel-LM trains its own 32,000-token tokenizer,
XGen uses a 51,200-token GPT-2-style vocabulary, ChuXin a 102,400-token one."""

DEFAULT_VOCAB_SIZE = 4096

_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}"
MAX_CJK_RUN = 32
"""Longest CJK piece: a longer run (unpunctuated text) is cut every 32 characters."""

SPLIT_PATTERN = "|".join(
    [
        r"'(?:[sdmt]|ll|ve|re)",  # English contractions
        rf"[{_CJK}]{{1,{MAX_CJK_RUN}}}",  # a run of CJK characters (Chinese words)
        r"\p{N}",  # each digit alone
        rf" ?[^\s\p{{N}}\p{{P}}\p{{S}}{_CJK}]+",  # a word, with its leading space
        r" ?[\p{P}\p{S}]+[\r\n]*",  # a punctuation / operator run
        r"\s*[\r\n]+",  # newlines with the indentation before them
        r"\s+(?!\S)",  # a whitespace run, leaving one space for the next word
        r"\s+",
    ]
)
"""Pre-tokenizer regex: BPE merges never cross these pieces. Unmatched text is kept, not dropped.

Chinese has no spaces, so CJK characters stay together up to punctuation and BPE can learn words
(中国, 我们, 非常). On held-out modern Chinese at vocab 32,000 (20 MB zh/en/code sample) this takes
People's Daily from 1,143 to 773 tokens per 1,000 Han characters and Chinese man pages from 1,926
to 1,468; one character per piece cannot go below one token per character. The cost is vocabulary
that now goes to Chinese words: English bytes/token 3.82 -> 3.69 at the same sample mix (set
`source_shares` to trade it back). The cap keeps BPE training fast on unpunctuated text, where
time grows faster than linearly with piece length (one 200,000-character run: over 300 s uncapped,
1.2 s at 32); at 32 it costs no measurable compression (caps of 2-8 do: words get cut anywhere).
"""


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    """How to train the BPE tokenizer.

    The final vocabulary is the trained one (at most `vocab_size`, fewer if the text runs out of
    pairs to merge) plus reserved tokens up to the next multiple of `pad_to_multiple_of`.
    """

    vocab_size: int = DEFAULT_VOCAB_SIZE
    """Trained vocabulary size, including the 256 byte tokens and the special tokens. With a
    `preset`, leave it at the default (or set the preset's own size): the preset supplies it."""
    preset: str | None = None
    """Take `vocab_size` from VOCAB_PRESETS ("xmodel-lm", "xgen", "chuxin"); a different explicit
    `vocab_size` is an error rather than silently ignored."""
    pad_to_multiple_of: int | None = None
    """Append `<|reserved_N|>` special tokens after training until the total vocabulary is a
    multiple of this (64 or 128 give GPU-friendly embedding shapes); None adds none."""
    min_frequency: int = 2
    """A pair must occur at least this often in the training text to be merged."""
    max_train_bytes: int | None = None
    """Train on at most this many UTF-8 bytes of text; None uses all of it."""
    source_shares: dict[str, float] = field(default_factory=dict)
    """Share of the training sample per data source, e.g. {chinese: 1, english: 1} for a
    balanced bilingual vocabulary (Xmodel-LM); empty uses the sources' weights, else equal."""

    def __post_init__(self) -> None:
        if self.preset is not None:
            if self.preset not in VOCAB_PRESETS:
                raise ValueError(
                    f"preset: unknown tokenizer preset {self.preset!r}; "
                    f"one of {sorted(VOCAB_PRESETS)}"
                )
            size = VOCAB_PRESETS[self.preset]
            if self.vocab_size not in (DEFAULT_VOCAB_SIZE, size):
                raise ValueError(
                    f"vocab_size: {self.vocab_size} conflicts with preset {self.preset!r} "
                    f"({size}); drop one of them"
                )
            object.__setattr__(self, "vocab_size", size)  # frozen: resolve once, here
        min_vocab = 256 + len(SPECIAL_TOKENS)
        if self.vocab_size < min_vocab:
            raise ValueError(
                f"vocab_size: {self.vocab_size} is too small; use at least {min_vocab}"
            )
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(
                f"pad_to_multiple_of: must be a positive integer, got {self.pad_to_multiple_of}"
            )
        if self.min_frequency < 0:
            raise ValueError(f"min_frequency: must be >= 0, got {self.min_frequency}")
        if self.max_train_bytes is not None and self.max_train_bytes < 1:
            raise ValueError(f"max_train_bytes: must be positive, got {self.max_train_bytes}")


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
    """Train byte-level BPE on `texts` (streamed), then pad the vocab (`pad_to_multiple_of`)."""
    tokenizer = build_untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_limit_bytes(texts, cfg.max_train_bytes), trainer=trainer)
    trained = tokenizer.get_vocab_size(with_added_tokens=True)
    if cfg.pad_to_multiple_of is not None:
        _pad_vocab(tokenizer, cfg.pad_to_multiple_of)
    total = tokenizer.get_vocab_size(with_added_tokens=True)
    log.info("trained tokenizer: %d tokens + %d reserved = %d", trained, total - trained, total)
    return TextTokenizer(tokenizer)


def _pad_vocab(tokenizer: Tokenizer, multiple: int) -> None:
    """Add reserved special tokens until the vocabulary size is a multiple of `multiple`."""
    i = 0
    while tokenizer.get_vocab_size(with_added_tokens=True) % multiple:
        name = RESERVED_TOKEN.format(i)
        i += 1
        if tokenizer.token_to_id(name) is None:  # a merge could spell it; then skip that name
            tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False)])


def sample_sources(
    streams: dict[str, Iterator[str]], shares: dict[str, float], max_bytes: int | None
) -> Iterator[str]:
    """Interleave documents so each source's UTF-8 bytes follow `shares` (normalized).

    Always pulls the next document from the source furthest behind its share (lowest
    bytes_so_far / share; ties go to the earlier source in `streams`), so the sample is
    deterministic. A source that runs out is dropped and the others continue. Stops once
    `max_bytes` have been yielded, cutting the last document (at a character boundary) so the
    total never exceeds it. Empty documents are skipped.
    """
    if set(streams) != set(shares):
        raise ValueError(f"shares: sources {sorted(shares)} do not match streams {sorted(streams)}")
    for name, share in shares.items():
        if not share > 0:
            raise ValueError(f"shares: {name!r} has share {share}; shares must be positive")
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes: must be >= 0, got {max_bytes}")
    total_share = sum(shares.values())
    target = {name: shares[name] / total_share for name in streams}
    seen = dict.fromkeys(streams, 0)
    live = list(streams)
    total = 0
    while live and (max_bytes is None or total < max_bytes):
        name = min(live, key=lambda n: seen[n] / target[n])
        text = next(streams[name], None)
        if text is None:
            live.remove(name)
            log.info("sample_sources: %r ran out after %d bytes", name, seen[name])
            continue
        data = text.encode("utf-8")
        if max_bytes is not None and total + len(data) > max_bytes:
            text = data[: max_bytes - total].decode("utf-8", errors="ignore")
            data = text.encode("utf-8")
            total = max_bytes  # a cut mid-character drops that character; stop either way
        else:
            total += len(data)
        seen[name] += len(data)
        if text:
            yield text
    log.info("sample_sources: bytes per source %s", seen)


def _limit_bytes(texts: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    """The texts up to max_bytes of UTF-8 in all, the last one cut at a character boundary."""
    total = 0
    for text in texts:
        if max_bytes is not None and total + len(data := text.encode("utf-8")) > max_bytes:
            cut = data[: max_bytes - total].decode("utf-8", errors="ignore")
            if cut:
                yield cut
            return
        yield text
        total += len(text.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            return  # not one text more is read
