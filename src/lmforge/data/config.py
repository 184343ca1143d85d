"""What the data stage is asked to do (the recipe's `data:` section): which sources, how to
clean, deduplicate, split, shard and mix them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmforge.data.clean import CleanConfig
from lmforge.data.dedup import DedupConfig
from lmforge.data.mixture import MixtureStage
from lmforge.data.sources import DataError, SourceConfig

DEFAULT_SOURCES = (
    SourceConfig(name="english", path="builtin:english", max_bytes=500_000),
    SourceConfig(name="chinese", path="builtin:chinese", max_bytes=500_000),
    SourceConfig(name="code", path="builtin:code", max_bytes=500_000),
)
"""The demo corpus: ~1.5 MB in all (pydoc topics hold only ~0.47 MB, so English is the cap)."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which sources to tokenize, how to clean, split and shard them, and how to mix them."""

    sources: tuple[SourceConfig, ...] = DEFAULT_SOURCES
    """Raw-text sources, tokenized in this order; names must be unique."""
    clean: CleanConfig = field(default_factory=CleanConfig)
    """Normalization and quality filters, applied to every source."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Exact (and optionally MinHash near-) duplicate removal across all sources."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad input (malformed line, invalid UTF-8, missing field, empty file, huge document):
    stop with an error naming file:line, or skip it, count it and log it in rejects.jsonl."""
    heldout_fraction: float = 0.05
    """Share of documents (chosen by a hash of their text) that go to the val split."""
    shard_tokens: int = 50_000_000
    """Start a new shard file once this many tokens would be exceeded (also the restart grain)."""
    batch_docs: int = 256
    """Documents per unit of parallel work."""
    workers: int = 0
    """Worker processes for cleaning and tokenizing; 0 = one per CPU core, 1 = in-process."""
    mixture_stages: tuple[MixtureStage, ...] = ()
    """Pretraining mixture changes: new source weights from a stream position on."""

    def __post_init__(self) -> None:
        names = [s.name for s in self.sources]
        if not names or len(set(names)) != len(names):
            raise DataError(f"data.sources: need at least one source and unique names, got {names}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise DataError(
                f"data.heldout_fraction: must be in [0, 1), got {self.heldout_fraction}"
            )
        if self.shard_tokens <= 0 or self.batch_docs <= 0 or self.workers < 0:
            raise DataError("data.shard_tokens and data.batch_docs must be > 0, workers >= 0")
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            raise DataError(
                "data.sources: give every source a weight, or none (natural shares); "
                f"weights: { {s.name: s.weight for s in self.sources} }"
            )
        unknown = {k for s in self.mixture_stages for k in s.weights} - set(names)
        if unknown:
            raise DataError(f"data.mixture_stages: unknown sources {sorted(unknown)}; have {names}")
