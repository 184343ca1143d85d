"""Continuous batching: requests that arrive while others decode join the running batch at its
next step and leave it when they end, so concurrent requests share each read of the weights.

One thread owns the model. Each step it prefills the prompts that arrived (each alone, at its
own length; a chunk at a time while others decode), merges those complete into the batch's
left-padded cache, samples one token for every row, drops the rows that ended, and runs one
forward pass for the rest. Every row draws
from its own generator (the request's seed + sample index), so a request gets what `generate`
(n = 1) or `generate_samples` (n > 1) would give it alone, whatever else shares its steps.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

import torch

from lmforge.generate import (
    Finished,
    GenerateConfig,
    check_prompts,
    decode_step,
    last_logits,
    row_generators,
    sample_rows,
)
from lmforge.model.attention import KVCache
from lmforge.model.llama import Llama

log = logging.getLogger(__name__)

_END = object()
"""Queued after a sample's last token."""


class Submitted:
    """A request handed to the batcher. Its samples' tokens arrive as they are sampled;
    `cancel` (or closing the `tokens` iterator) takes its rows out of the batch at the next step.
    """

    def __init__(
        self,
        prompt_ids: list[int],
        n: int,
        cfg: GenerateConfig,
        stop_ids: Collection[int],
        finished: Finished | None,
    ) -> None:
        self.prompt_ids, self.n, self.cfg = prompt_ids, n, cfg
        self.stop_ids, self.finished = frozenset(stop_ids), finished
        self.cancelled = threading.Event()
        self._out: queue.SimpleQueue[tuple[int, object]] = queue.SimpleQueue()

    def tokens(self) -> Iterator[int]:
        """The one sample's token ids as they are sampled (n = 1); closing it cancels."""
        if self.n != 1:
            raise ValueError(f"tokens() streams one sample; this request has n = {self.n}")
        return self._stream()

    def _stream(self) -> Iterator[int]:
        try:
            while (item := self._next()[1]) is not _END:
                yield item  # type: ignore[misc]
        finally:
            self.cancel()

    def samples(self) -> list[list[int]]:
        """Every sample's token ids, once all have ended."""
        out: list[list[int]] = [[] for _ in range(self.n)]
        open_samples = self.n
        while open_samples:
            sample, item = self._next()
            if item is _END:
                open_samples -= 1
            else:
                out[sample].append(item)  # type: ignore[arg-type]
        return out

    def cancel(self) -> None:
        self.cancelled.set()

    def _next(self) -> tuple[int, object]:
        sample, item = self._out.get()
        if isinstance(item, BaseException):
            raise RuntimeError("generation failed in the batching thread") from item
        return sample, item

    def _put(self, sample: int, item: object) -> None:
        self._out.put((sample, item))

    def _end(self, error: BaseException | None = None) -> None:
        """End every sample: before any has a token, or with an error (read as raised)."""
        for sample in range(self.n):
            self._put(sample, _END if error is None else error)


@dataclass(eq=False)
class _Row:
    """One sample of one request, in the batch."""

    request: Submitted
    sample: int
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)

    @property
    def left(self) -> int:
        """Tokens it may still be given."""
        return self.request.cfg.max_new_tokens - len(self.ids)


@dataclass(eq=False)
class _Prefill:
    """A request whose prompt is being prefilled into a one-row cache of its own."""

    request: Submitted
    cache: KVCache

    @property
    def left(self) -> int:
        """Prompt tokens not yet prefilled."""
        return len(self.request.prompt_ids) - self.cache.length


class ContinuousBatcher:
    """Decodes every submitted request in one shared batch, on a thread of its own.

    While rows are decoding, a joining prompt is prefilled `prefill_chunk` tokens per step
    (chunked prefill), so a long prompt delays the others' next token by one chunk's forward
    pass, not by its whole prefill. The model is put in eval mode and must not be used
    elsewhere while the batcher runs."""

    def __init__(self, model: Llama, compile: bool = False, prefill_chunk: int = 256) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model.eval()
        self.step = decode_step(self.model, compile)
        self.prefill_chunk = prefill_chunk
        self._pending: list[Submitted] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        # owned by the thread:
        self._prefills: list[_Prefill] = []
        self._rows: list[_Row] = []
        self._cache: KVCache | None = None
        self._logits: torch.Tensor | None = None
        """(rows, V): each row's next-token logits."""
        self.steps = 0
        """Decode steps run so far (forward passes over the batch, prefills not counted)."""
        self.widest = 0
        """Most rows decoded in one step so far."""

    @property
    def busy(self) -> bool:
        """Requests queued, prefilling or decoding."""
        return bool(self._pending or self._prefills or self._rows)

    def submit(
        self,
        prompt_ids: list[int],
        cfg: GenerateConfig,
        n: int = 1,
        stop_ids: Collection[int] = (),
        finished: Finished | None = None,
    ) -> Submitted:
        """Queue a request of n samples after prompt_ids; it joins the batch at the next step.
        Each sample ends at a stop id, `finished(sample, ids)`, or cfg.max_new_tokens."""
        if n < 1:
            raise ValueError(f"submit: n must be >= 1, got {n}")
        check_prompts([prompt_ids])
        request = Submitted(list(prompt_ids), n, cfg, stop_ids, finished)
        if cfg.max_new_tokens == 0:
            request._end()
            return request
        with self._wake:
            if self._closed:
                raise RuntimeError("ContinuousBatcher is closed")
            self._pending.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
                self._thread.start()
            self._wake.notify()
        return request

    def warm_up(self) -> None:
        """Decode a few tiny requests in the shapes serving meets: left-padded rows that end one
        by one down to one, rows of equal length (no padding), and one request alone. Compiled
        (`compile`), that builds every graph before the first real request instead of making
        it and its batch wait for each compile in turn."""
        greedy = [GenerateConfig(max_new_tokens=n, temperature=0.0) for n in range(5)]
        waves = [
            [([1, 2, 3], 4), ([1, 2], 3), ([1], 2)],
            [([1, 2], 3), ([2, 1], 2)],
            [([1, 2, 3], 2)],
        ]
        for wave in waves:
            with self._wake:  # re-entrant: the thread takes the whole wave as one batch
                requests = [self.submit(prompt, greedy[n]) for prompt, n in wave]
            for request in requests:
                request.samples()

    def close(self) -> None:
        """Stop the thread after its current step; requests still queued or decoding fail."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._pending or self._prefills or self._rows or self._closed):
                    self._wake.wait()
                joining, self._pending = self._pending, []
                closed = self._closed
            if closed:
                self._fail(joining, RuntimeError("ContinuousBatcher closed"))
                return
            ready: list[tuple[_Prefill, torch.Tensor]] = []
            try:
                with torch.inference_mode():
                    self._prefills += [self._start(r) for r in joining]
                    ready = self._prefill()
                    if ready:
                        self._join(ready)
                    if self._rows:
                        self._decode()
            except Exception as e:  # the requests in flight fail; the server goes on
                log.exception("batched decode step failed")
                self._fail(joining + [prefill.request for prefill, _ in ready], e)

    def _fail(self, joining: list[Submitted], error: BaseException) -> None:
        """Fail every request in flight, and `joining` (taken from the queue, or prefilled but
        not yet in the batch); start afresh."""
        requests = {row.request for row in self._rows} | {p.request for p in self._prefills}
        for request in requests | set(joining):
            request._end(error)
        self._prefills, self._rows, self._cache, self._logits = [], [], None, None

    def _start(self, request: Submitted) -> _Prefill:
        param = next(self.model.parameters())
        length = len(request.prompt_ids)
        return _Prefill(request, KVCache(self.model.cfg, 1, length, param.device, param.dtype))

    def _prefill(self) -> list[tuple[_Prefill, torch.Tensor]]:
        """Run the next prompt tokens of the waiting prefills, oldest first: at most
        `prefill_chunk` while rows are decoding, all of them otherwise. Returns the prefills
        now complete, with their last token's logits (1, V)."""
        budget = self.prefill_chunk if self._rows else None
        ready, waiting = [], []
        for prefill in self._prefills:
            request = prefill.request
            if request.cancelled.is_set():  # gone before it started decoding
                request._end()
                continue
            take = prefill.left if budget is None else min(prefill.left, budget)
            if take:
                budget = None if budget is None else budget - take  # counts finished prompts too
                start = prefill.cache.length
                chunk = request.prompt_ids[start : start + take]
                ids = torch.tensor([chunk], dtype=torch.long, device=prefill.cache.device)
                if take == prefill.left:
                    ready.append((prefill, last_logits(self.model, ids, prefill.cache)))
                    continue
                self.model.hidden_states(ids, cache=prefill.cache)  # no logits mid-prompt
            waiting.append(prefill)
        self._prefills = waiting
        return ready

    def _join(self, ready: list[tuple[_Prefill, torch.Tensor]]) -> None:
        """Merge prefilled requests into the batch: n rows each, sharing the prompt's cache."""
        param = next(self.model.parameters())
        new_rows, new_logits = [], []
        for prefill, logits in ready:
            request = prefill.request
            new_logits.append(logits.expand(request.n, -1))
            generators = row_generators(request.cfg, request.n, param.device)
            new_rows += [_Row(request, i, g) for i, g in enumerate(generators)]
        self._rows += new_rows
        room = max(row.left for row in self._rows)
        parts = [(prefill.cache, prefill.request.n) for prefill, _ in ready]
        self._cache = merge_caches(self.model, self._cache, parts, room, param.device, param.dtype)
        old = [self._logits] if self._logits is not None else []
        self._logits = torch.cat([*old, *new_logits])

    def _decode(self) -> None:
        """Sample one token per row, drop the rows that ended, run the rest one step."""
        rows, cache, logits = self._rows, self._cache, self._logits
        assert cache is not None and logits is not None
        tokens = torch.zeros(len(rows), dtype=torch.long, device=logits.device)
        failed: dict[Submitted, Exception] = {}
        for idx, cfg in _by_sampling(rows):
            gens = [rows[i].generator for i in idx]
            try:
                tokens[idx] = sample_rows(logits[idx], cfg, gens)
            except Exception as e:  # these rows' own settings failed: their requests alone fail
                log.exception("sampling failed for %d rows", len(idx))
                failed.update((rows[i].request, e) for i in idx)
        live = []
        for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            request = row.request
            if request in failed:
                if not request.cancelled.is_set():  # once per request, not per sample
                    request._end(failed[request])
                    request.cancel()
                continue
            row.ids.append(token)
            request._put(row.sample, token)
            try:
                ended = _ended(row, token)
            except Exception as e:  # the request's own `finished` failed: it alone fails
                request._end(e)
                request.cancel()
                continue
            if ended:
                request._put(row.sample, _END)
            else:
                live.append(i)
        if not live:
            self._rows, self._cache, self._logits = [], None, None
            return
        if len(live) < len(rows):
            keep = torch.tensor(live, device=tokens.device)
            cache.keep(keep)
            tokens, rows = tokens[keep], [rows[i] for i in live]
        self.steps += 1
        self.widest = max(self.widest, len(rows))
        self._rows, self._logits = rows, self.step(self.model, tokens[:, None], cache)


def _ended(row: _Row, token: int) -> bool:
    """Whether the row ends with this token (just appended to row.ids)."""
    request = row.request
    return (
        token in request.stop_ids
        or not row.left
        or request.cancelled.is_set()
        or (request.finished is not None and request.finished(row.sample, row.ids))
    )


def _by_sampling(rows: list[_Row]) -> Iterator[tuple[list[int], GenerateConfig]]:
    """Row indices grouped by how they sample (temperature, top-k, top-p), with a config of each
    group: one batched filter per group."""
    groups: dict[tuple[float, int | None, float | None], list[int]] = {}
    for i, row in enumerate(rows):
        cfg = row.request.cfg
        greedy = cfg.temperature == 0
        key = (0.0, None, None) if greedy else (cfg.temperature, cfg.top_k, cfg.top_p)
        groups.setdefault(key, []).append(i)
    for idx in groups.values():
        yield idx, rows[idx[0]].request.cfg


def merge_caches(
    model: Llama,
    batch: KVCache | None,
    prefilled: list[tuple[KVCache, int]],
    room: int,
    device: torch.device,
    dtype: torch.dtype,
) -> KVCache:
    """One left-padded cache: the batch's rows, then each prefilled one-row cache repeated n
    times, every row's own tokens right-aligned at a common length, with `room` free slots.

    The batch keeps only its rows' own tokens: slots before its earliest start (padding left by
    rows that have ended) are dropped."""
    spans = [alone.length for alone, _ in prefilled]
    first = 0
    if batch is not None:
        first = int(batch.starts.min()) if batch.starts is not None else 0
        spans.append(batch.length - first)
    length = max(spans)
    n_batch = batch.batch_size if batch is not None else 0
    n_rows = n_batch + sum(n for _, n in prefilled)
    starts = torch.empty(n_rows, dtype=torch.long, device=device)
    merged = KVCache(model.cfg, n_rows, length + room, device, dtype)
    if batch is not None:
        shift = length - (batch.length - first)
        merged.copy_in(slice(0, n_batch), shift, batch, slice(None), slice(first, batch.length))
        old = batch.starts if batch.starts is not None else torch.zeros_like(starts[:n_batch])
        starts[:n_batch] = old - first + shift
    row = n_batch
    for alone, n in prefilled:
        span = alone.length
        merged.copy_in(slice(row, row + n), length - span, alone, slice(0, 1), slice(0, span))
        starts[row : row + n] = length - span
        row += n
    merged.length = length
    merged.starts = starts if bool(starts.any()) else None  # None keeps the mask-free kernels
    return merged
