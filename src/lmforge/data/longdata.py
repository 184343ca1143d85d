"""Long-context data for context-extension stages, as mixture sources a stage can weight.

ChuXin extends its context with long documents upsampled and long data synthesized. Three
derived sources give a stage's mixture that data from the run's own train split:

- `long_docs`: only the documents of at least `min_tokens` tokens (from every source), so
  weighting it upsamples long documents;
- `concat_docs`: consecutive documents of one source (neighbours in corpus order: the same
  site, repository or book, as far as the corpus keeps them together) joined into one document
  of `concat_tokens`, so the model must carry context across what were document boundaries;
- `passkey`: retrieval sequences of `passkey_tokens` tokens (`passkey_N`: of N tokens, so each
  stage can have sequences that fit its rows): corpus text as the haystack, a random pass key
  stated at a random depth, and the question asking for it at the end (the format of
  Mohtashami & Jaggi 2023 that eval/needle.py tests), over real text or, with
  `passkey_haystack: filler`, over that test's repeated sentences.

Each is a `Documents` view: document i is a pure function of i and the seed, so the loader's
resumable draw works on them unchanged. They are added to a run only when a mixture names them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lmforge.data.mixture import Documents

LONG_DOCS, CONCAT_DOCS, PASSKEY = "long_docs", "concat_docs", "passkey"
DERIVED_SOURCES = (LONG_DOCS, CONCAT_DOCS, PASSKEY, f"{PASSKEY}_N")


def is_derived(name: str) -> bool:
    return name in (LONG_DOCS, CONCAT_DOCS, PASSKEY) or passkey_length(name) is not None


def passkey_length(name: str) -> int | None:
    """N of a `passkey_N` source name, else None."""
    prefix = f"{PASSKEY}_"
    if name.startswith(prefix) and name[len(prefix) :].isdigit():
        return int(name[len(prefix) :])
    return None


@dataclass(frozen=True, kw_only=True)
class LongDataConfig:
    min_tokens: int = 1024
    """`long_docs` holds the documents of at least this many tokens."""
    concat_tokens: int = 4096
    """Length of each `concat_docs` document."""
    passkey_tokens: int = 4096
    """Length of each `passkey` sequence."""
    passkey_docs: int = 100_000
    """Distinct passkey sequences per epoch of that source."""
    passkey_min_fraction: float = 1.0
    """Each passkey sequence's length is drawn uniformly from [fraction x N, N] (1: all N).
    At one fixed length a small model can key its answer on where the question sits rather
    than on what it says, and then retrieves at that length only."""
    passkey_haystack: str = "corpus"
    """What the key hides in: `corpus` text, or `filler`, the repeated sentences of the original
    test, which a small model predicts at once, so its loss on passkey rows is the retrieval."""
    passkey_loss: str = "all"
    """Which passkey tokens are trained on: `all`, or only the `answer` after the question (as
    instruction tuning masks prompts). The key's first statement is random digits no model can
    predict, and the haystack teaches nothing about retrieval: the answer is the one signal."""

    def __post_init__(self) -> None:
        for key in ("min_tokens", "concat_tokens", "passkey_tokens", "passkey_docs"):
            if getattr(self, key) <= 0:
                raise ValueError(f"long_data.{key} must be > 0, got {getattr(self, key)}")
        if self.passkey_haystack not in ("corpus", "filler"):
            got = self.passkey_haystack
            raise ValueError(f"long_data.passkey_haystack must be corpus or filler, got {got!r}")
        if not 0 < self.passkey_min_fraction <= 1:
            fraction = self.passkey_min_fraction
            raise ValueError(f"long_data.passkey_min_fraction must be in (0, 1], got {fraction}")
        if self.passkey_loss not in ("all", "answer"):
            got = self.passkey_loss
            raise ValueError(f"long_data.passkey_loss must be all or answer, got {got!r}")


class LongDocuments:
    """The documents of `sources` with at least `min_tokens` tokens, in source order."""

    def __init__(self, sources: Sequence[Documents], min_tokens: int) -> None:
        self.sources = list(sources)
        self.index = [
            (s, i)
            for s, docs in enumerate(self.sources)
            for i in range(docs.num_docs)
            if len(docs.document(i)) >= min_tokens
        ]
        self.num_docs = len(self.index)

    def document(self, index: int) -> np.ndarray:
        source, i = self.index[index]
        return self.sources[source].document(i)


class ConcatDocuments:
    """Runs of consecutive documents of one source joined by `separator` and cut to `length`
    tokens; what is left at the end of a source makes one shorter document."""

    def __init__(self, sources: Sequence[Documents], length: int, separator: Sequence[int]) -> None:
        self.sources, self.length = list(sources), length
        self.separator = np.asarray(separator)
        self.runs: list[tuple[int, int, int]] = []  # (source, first doc, end doc)
        for s, docs in enumerate(self.sources):
            first, total = 0, 0
            for i in range(docs.num_docs):  # separators between documents, not after the last
                total += len(docs.document(i)) + (len(self.separator) if i > first else 0)
                if total >= length:
                    self.runs.append((s, first, i + 1))
                    first, total = i + 1, 0
            if first < docs.num_docs:  # the rest, shorter
                self.runs.append((s, first, docs.num_docs))
        self.num_docs = len(self.runs)

    def document(self, index: int) -> np.ndarray:
        source, first, end = self.runs[index]
        docs = self.sources[source]
        parts: list[np.ndarray] = []
        for i in range(first, end):
            parts += [docs.document(i), self.separator]
        return np.concatenate(parts[:-1])[: self.length]


class PasskeyDocuments:
    """`num_docs` retrieval sequences of `length` tokens over a haystack of corpus text; with
    `answer_only`, only the answer tokens are targets; with `min_length`, each of a length
    drawn from [min_length, length]. Given `sentence_ends` (token ids), the haystack starts at a
    sentence and the needle goes between sentences, as the test lays its prompts out
    (eval/needle.py); otherwise both fall on any token."""

    def __init__(
        self,
        haystack: Documents,
        length: int,
        encode: Callable[[str], list[int]],
        num_docs: int,
        seed: int,
        answer_only: bool = False,
        sentence_ends: frozenset[int] = frozenset(),
        min_length: int | None = None,
    ) -> None:
        from lmforge.eval.needle import PASSKEY_PREAMBLE, PASSKEY_QUESTION

        self.haystack, self.length, self.encode = haystack, length, encode
        self.num_docs, self.seed = num_docs, seed
        self.min_length = length if min_length is None else min_length
        self.sentence_ends = np.fromiter(sentence_ends, dtype=np.int64)
        self.preamble = encode(PASSKEY_PREAMBLE)
        self.question = encode(PASSKEY_QUESTION)
        self.answer_only = answer_only
        self._last: tuple[int, np.ndarray] | None = None
        """The last document built: the loader asks for one document several times in a row
        (its draw, a row's peek and advance reads, the target mask)."""

    def _key(self, index: int) -> tuple[np.random.Generator, int, list[int]]:
        """Document `index`'s generator (after drawing the key), key and answer tokens. Seeded
        by the length too: `passkey_512` and `passkey_1024` in one stage hide different keys."""
        rng = np.random.default_rng([self.seed, self.length, index])
        key = int(rng.integers(10_000, 100_000))
        return rng, key, self.encode(f" {key}.")

    def target_mask(self, index: int) -> np.ndarray | None:
        """Only the answer with `answer_only`, else None (every token)."""
        if not self.answer_only:
            return None
        mask = np.zeros(len(self.document(index)), dtype=bool)
        mask[len(mask) - len(self._key(index)[2]) :] = True
        return mask

    def document(self, index: int) -> np.ndarray:
        if self._last is None or self._last[0] != index:
            self._last = (index, self._build(index))
        return self._last[1]

    def _build(self, index: int) -> np.ndarray:
        rng, key, answer = self._key(index)
        needle = self.encode(f" The pass key is {key}. Remember it. {key} is the pass key.")
        length = self.length
        if self.min_length < length:
            length = int(rng.integers(self.min_length, length + 1))
        room = length - len(self.preamble) - len(needle) - len(self.question) - len(answer)
        filler = self._filler(rng, max(room, 0))
        depth = int(rng.integers(0, len(filler) + 1))
        if len(self.sentence_ends) and depth < len(filler):  # back off to a sentence end
            ends = np.flatnonzero(np.isin(filler[:depth], self.sentence_ends))
            depth = int(ends[-1]) + 1 if len(ends) else 0
        pieces = [self.preamble, filler[:depth], needle, filler[depth:], self.question, answer]
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces])

    def _filler(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n tokens of consecutive haystack text from a random token of a random document on
        (wrapping around the set). Not from document starts: a small corpus has few of them,
        and a model that can memorize its haystacks learns them instead of retrieval."""
        i = int(rng.integers(0, self.haystack.num_docs))
        doc = self.haystack.document(i)
        start = int(rng.integers(0, max(len(doc), 1)))
        if len(self.sentence_ends):  # on to the next sentence start, if the document has one
            ends = np.flatnonzero(np.isin(doc[start:], self.sentence_ends))
            start = start + int(ends[0]) + 1 if len(ends) else start
        parts = [doc[start:]]
        have, empty_run = len(parts[0]), 0
        while have < n and empty_run <= self.haystack.num_docs:
            i = (i + 1) % self.haystack.num_docs
            doc = self.haystack.document(i)
            parts.append(doc)
            have += len(doc)
            empty_run = empty_run + 1 if len(doc) == 0 else 0
        return np.concatenate(parts)[:n].astype(np.int64)


class RepeatedText:
    """One document: a text's tokens (the passkey filler), which `_filler` wraps around."""

    num_docs = 1

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = np.asarray(tokens, dtype=np.int64)

    def document(self, index: int) -> np.ndarray:
        return self.tokens


class ConcatenatedSet:
    """Several document sets behind one index, in order."""

    def __init__(self, sets: Sequence[Documents]) -> None:
        self.sets = list(sets)
        self.starts = np.cumsum([0, *(s.num_docs for s in self.sets)])
        self.num_docs = int(self.starts[-1])

    def document(self, index: int) -> np.ndarray:
        s = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.sets[s].document(index - int(self.starts[s]))


def derived_sources(
    names: set[str],
    train: Mapping[str, Documents],
    cfg: LongDataConfig,
    encode: Callable[[str], list[int]],
    seed: int,
    sentence_ends: frozenset[int] = frozenset(),
) -> dict[str, Documents]:
    """The derived sources among `names`, built over the run's train split; `sentence_ends`
    (token ids) align passkey haystacks and needles to sentences."""
    sets = list(train.values())
    built: dict[str, Documents] = {}
    if LONG_DOCS in names:
        long_docs = LongDocuments(sets, cfg.min_tokens)
        if long_docs.num_docs == 0:
            raise ValueError(
                f"long_docs: no train document has long_data.min_tokens={cfg.min_tokens} tokens"
            )
        built[LONG_DOCS] = long_docs
    if CONCAT_DOCS in names:
        built[CONCAT_DOCS] = ConcatDocuments(sets, cfg.concat_tokens, encode("\n\n"))
    if cfg.passkey_haystack == "filler":
        from lmforge.eval.needle import PASSKEY_FILLER

        haystack: Documents = RepeatedText(encode(PASSKEY_FILLER))
    else:
        haystack = ConcatenatedSet(sets)
    for name in sorted(names):
        length = cfg.passkey_tokens if name == PASSKEY else passkey_length(name)
        if length is not None:
            answer_only = cfg.passkey_loss == "answer"
            shortest = max(1, round(cfg.passkey_min_fraction * length))
            built[name] = PasskeyDocuments(
                haystack,
                length,
                encode,
                cfg.passkey_docs,
                seed,
                answer_only,
                sentence_ends,
                shortest,
            )
    return built
