"""Best-of-N timing of several ways to do the same work, taking turns so drift hits all alike."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of_alternating_rounds(
    ways: dict[str, Callable[[], object]], rounds: int
) -> dict[str, float]:
    """Seconds of each way's fastest run over `rounds` rounds; the order reverses every round."""
    best = {name: float("inf") for name in ways}
    for r in range(rounds):
        for name in list(ways)[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            ways[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best
