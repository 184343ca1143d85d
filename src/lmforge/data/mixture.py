"""Which document comes next: a deterministic, resumable draw from several sources by token share.

Each source walks its own seeded permutation, epoch after epoch. The next document always comes
from the source furthest behind its target share of tokens (drawn tokens / weight is smallest),
so realised shares track the targets to within one document at any point of a run, with no
randomness to replay. A source stops after `max_epochs` passes; the stream ends when all have.
Mixture stages (new weights from a token count on) restart the share accounting at the switch.

Everything a resumed run needs is the immutable `StreamState`; `draw` is a pure function of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np


class Documents(Protocol):
    """A set of token documents. One may also define `target_mask(index)`: a bool array over
    document `index`'s tokens saying which are predicted (e.g. only a retrieval answer), or None
    when all are; without it every token is."""

    num_docs: int

    def document(self, index: int) -> np.ndarray: ...


@dataclass(frozen=True, kw_only=True)
class MixtureStage:
    """New target shares from `from_tokens` tokens of the stream on (XGen's stage mixtures)."""

    from_tokens: int
    """Stream position (tokens of documents drawn so far) where these weights take over."""
    weights: dict[str, float] = field(default_factory=dict)
    """Weight per source name; a source not listed keeps the weight in force before (its own
    `weight` until some stage sets one), as recipe stages' `mixture` does."""

    def __post_init__(self) -> None:
        if self.from_tokens < 0 or not all(w >= 0 for w in self.weights.values()):  # NaN too
            raise ValueError(
                f"mixture stage at {self.from_tokens}: tokens and weights must be >= 0"
            )


@dataclass(frozen=True)
class MixtureSource:
    name: str
    docs: Documents
    weight: float = 1.0
    max_epochs: float | None = None
    """None: repeat forever (shuffled streams) — a source never runs dry by itself."""

    @property
    def max_docs(self) -> float:
        """Documents this source may yield in all (at least one when max_epochs is set)."""
        if self.max_epochs is None:
            return math.inf
        return max(1, round(self.max_epochs * self.docs.num_docs))


def mixture_for(
    tokens: int, base: Mapping[str, float], stages: Sequence[MixtureStage]
) -> dict[str, float]:
    """The target weights in force at stream position `tokens`: each stage started overrides
    the weights it lists, in order (data.mixture_stages and recipe stages' mixtures combine)."""
    weights = dict(base)
    for stage in sorted(stages, key=lambda s: s.from_tokens):
        if tokens >= stage.from_tokens:
            weights = {**weights, **stage.weights}
    return weights


def stage_index(tokens: int, stages: Sequence[MixtureStage]) -> int:
    """How many stages have started at `tokens` (0 = the sources' own weights)."""
    return sum(tokens >= s.from_tokens for s in stages)


@dataclass(frozen=True)
class StreamState:
    """The draw's whole state; tuples hold one entry per source, in source order."""

    epochs: tuple[int, ...]
    """Current epoch of each source."""
    positions: tuple[int, ...]
    """Next index into each source's order for its current epoch."""
    drawn: tuple[int, ...]
    """Tokens of documents drawn from each source since the current mixture stage began."""
    stage: int = 0
    tokens: int = 0
    """Tokens of all documents drawn so far (the stream position)."""

    @classmethod
    def start(cls, num_sources: int) -> StreamState:
        zeros = (0,) * num_sources
        return cls(zeros, zeros, zeros)


@dataclass(frozen=True)
class Draw:
    source: int
    epoch: int
    index: int
    """Document index within the source."""


class DocumentStream:
    """Draws documents from `sources`; shuffled per source and epoch, or in order."""

    def __init__(
        self,
        sources: Sequence[MixtureSource],
        seed: int = 0,
        shuffle: bool = True,
        stages: Sequence[MixtureStage] = (),
        overhead: int = 0,
    ) -> None:
        """`overhead`: tokens each document gains in the stream (2 for BOS and EOS), so shares
        count the tokens a model actually trains on."""
        names = [s.name for s in sources]
        if not sources or len(set(names)) != len(names):
            raise ValueError(f"need at least one source and unique names, got {names}")
        unknown = {k for st in stages for k in st.weights} - set(names)
        if unknown:
            raise ValueError(f"mixture stages name unknown sources {sorted(unknown)}; have {names}")
        for s in sources:
            if s.docs.num_docs == 0:
                raise ValueError(f"source {s.name!r} has no documents")
        self.sources, self.seed, self.shuffle = list(sources), seed, shuffle
        self.stages = sorted(stages, key=lambda s: s.from_tokens)
        self.overhead = overhead
        self._orders: dict[int, tuple[int, np.ndarray]] = {}

    def weights(self, stage: int) -> list[float]:
        base = {s.name: s.weight for s in self.sources}
        w = mixture_for(self.stages[stage - 1].from_tokens, base, self.stages) if stage else base
        return [w[s.name] for s in self.sources]

    def draw(self, state: StreamState) -> tuple[Draw, int, StreamState] | None:
        """The next document, its stream length and the state after it; None at the end."""
        stage = stage_index(state.tokens, self.stages)
        drawn = state.drawn if stage == state.stage else (0,) * len(self.sources)
        weights = self.weights(stage)
        best, best_key = -1, math.inf
        for i, (source, w) in enumerate(zip(self.sources, weights, strict=True)):
            used = state.epochs[i] * source.docs.num_docs + state.positions[i]
            if w > 0 and used < source.max_docs and drawn[i] / w < best_key:
                best, best_key = i, drawn[i] / w
        if best < 0:
            return None
        epoch, position = state.epochs[best], state.positions[best]
        index = int(self._order(best, epoch)[position])
        length = len(self.sources[best].docs.document(index)) + self.overhead
        position += 1
        if position == self.sources[best].docs.num_docs:
            epoch, position = epoch + 1, 0
        new = replace(
            state,
            epochs=_set(state.epochs, best, epoch),
            positions=_set(state.positions, best, position),
            drawn=_set(drawn, best, drawn[best] + length),
            stage=stage,
            tokens=state.tokens + length,
        )
        return Draw(best, state.epochs[best], index), length, new

    def document(self, d: Draw) -> np.ndarray:
        return self.sources[d.source].docs.document(d.index)

    def target_mask(self, d: Draw) -> np.ndarray | None:
        """Which tokens of the document are predicted; None = all."""
        mask = getattr(self.sources[d.source].docs, "target_mask", None)
        return None if mask is None else mask(d.index)

    def _order(self, source: int, epoch: int) -> np.ndarray:
        cached = self._orders.get(source)
        if cached is None or cached[0] != epoch:
            n = self.sources[source].docs.num_docs
            rng = np.random.default_rng([self.seed, source, epoch])
            cached = (epoch, rng.permutation(n) if self.shuffle else np.arange(n))
            self._orders[source] = cached
        return cached[1]


def _set(values: tuple[int, ...], i: int, value: int) -> tuple[int, ...]:
    return (*values[:i], value, *values[i + 1 :])
