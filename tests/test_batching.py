"""Continuous batching (lmforge.batching): requests that join a batch mid-decode, leave it early,
or fail get exactly what they would get decoded alone."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from lmforge import batching
from lmforge.batching import ContinuousBatcher, merge_caches
from lmforge.generate import GenerateConfig, generate, generate_samples, last_logits
from lmforge.model.attention import KVCache
from lmforge.model.llama import Llama

GREEDY = GenerateConfig(max_new_tokens=30, temperature=0.0)
PROMPT = [5, 17, 3, 42, 8]


@pytest.fixture(scope="module")
def model(decoder: Llama) -> Llama:
    return decoder


@contextmanager
def slowed(model: Llama, seconds: float) -> Iterator[None]:
    """Every forward pass sleeps first, so that requests submitted now overlap in the batch."""
    handle = model.lm_head.register_forward_pre_hook(lambda *_: time.sleep(seconds))
    try:
        yield
    finally:
        handle.remove()


def test_requests_joining_mid_decode_get_what_they_would_alone(model: Llama) -> None:
    """A request decoding alone is joined by one with a longer prompt than the batch's cache (the
    batch shifts right), a shorter one (left-padded), and n = 3 samples of a third; sampled ones
    use other temperatures and filters. Each equals `generate` / `generate_samples` alone."""
    batcher = ContinuousBatcher(model)
    first_cfg = GenerateConfig(max_new_tokens=40, temperature=0.0)
    late = [
        (list(range(3, 23)), GenerateConfig(max_new_tokens=15, temperature=0.0), 1),
        ([7, 9, 11], GenerateConfig(max_new_tokens=25, temperature=0.9, top_k=20, seed=5), 1),
        ([1, 2, 3, 4], GenerateConfig(max_new_tokens=10, temperature=1.0, top_k=None, seed=2), 3),
    ]
    with slowed(model, 0.01):
        stream = batcher.submit(PROMPT, first_cfg).tokens()
        first = [next(stream) for _ in range(6)]  # decoding, its cache 11 tokens long
        submitted = [batcher.submit(prompt, cfg, n) for prompt, cfg, n in late]
        first += list(stream)
        results = [s.samples() for s in submitted]
    batcher.close()
    assert first == generate(model, PROMPT, first_cfg)
    assert results[0] == [generate(model, *late[0][:2])]
    assert results[1] == [generate(model, *late[1][:2])]
    assert results[2] == generate_samples(model, *late[2][:1], 3, late[2][1])
    assert len(set(map(tuple, results[2]))) > 1  # the samples differ: each row has its seed
    assert batcher.widest == 6  # all four requests shared steps


def test_a_long_prompt_is_prefilled_in_chunks_between_the_batchs_steps(model: Llama) -> None:
    """With rows decoding, a 22-token prompt goes in chunks of at most 4 tokens, each followed
    by a decode step of the running rows; alone, a prompt is prefilled whole. Both requests
    equal `generate` alone."""
    calls: list[tuple[int, int]] = []  # (rows, tokens) of every forward pass
    hook = model.embed_tokens.register_forward_pre_hook(lambda _, a: calls.append(a[0].shape))
    batcher = ContinuousBatcher(model, prefill_chunk=4)
    long_prompt = list(range(1, 23))
    try:
        with slowed(model, 0.01):
            stream = batcher.submit(PROMPT, GREEDY).tokens()
            first = [next(stream) for _ in range(3)]
            late = batcher.submit(long_prompt, GREEDY)
            first += list(stream)
            late_ids = late.samples()[0]
    finally:
        hook.remove()
        batcher.close()
    assert first == generate(model, PROMPT, GREEDY)
    assert late_ids == generate(model, long_prompt, GREEDY)
    assert calls[0] == (1, len(PROMPT))  # nothing else running: the whole prompt at once
    chunks = [i for i, (rows, tokens) in enumerate(calls) if tokens > 1][1:]
    assert [calls[i][1] for i in chunks] == [4, 4, 4, 4, 4, 2]
    assert all(calls[i + 1] == (1, 1) for i in chunks[:-1])  # the running row's step between


def test_prompts_arriving_together_share_one_chunk_budget(model: Llama) -> None:
    """Several short prompts that arrive while a row decodes are prefilled at most
    `prefill_chunk` tokens between two steps, counting the ones that complete."""
    batcher = ContinuousBatcher(model, prefill_chunk=4)
    events: list[int | None] = []  # prompt tokens of a prefill pass; None: a decode step
    decode, stepping = batcher.step, [False]

    def step(*args: Any) -> torch.Tensor:
        events.append(None)
        stepping[0] = True
        try:
            return decode(*args)
        finally:
            stepping[0] = False

    def prefill(_: Any, args: tuple[torch.Tensor, ...]) -> None:
        if not stepping[0]:
            events.append(args[0].shape[1])

    batcher.step = step
    hook = model.embed_tokens.register_forward_pre_hook(prefill)
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9], list(range(1, 11))]
    try:
        with slowed(model, 0.01):
            stream = batcher.submit(PROMPT, GREEDY).tokens()
            first = [next(stream) for _ in range(2)]
            with batcher._wake:  # all four join at the same step
                late = [batcher.submit(prompt, GREEDY) for prompt in prompts]
            results = [request.samples()[0] for request in late]
            first += list(stream)
    finally:
        hook.remove()
        batcher.close()
    assert first == generate(model, PROMPT, GREEDY)
    assert results == [generate(model, prompt, GREEDY) for prompt in prompts]
    between_steps, prefilled = [], 0
    for event in events[2:]:  # after the first prompt and its first step
        if event is None:
            between_steps.append(prefilled)
            prefilled = 0
        else:
            prefilled += event
    assert max(between_steps) == 4 and sum(between_steps) + prefilled == 19


def test_merging_drops_padding_of_ended_rows_and_keeps_every_rows_function(model: Llama) -> None:
    """Rows of 6 and 2 prompt tokens, left-padded; the long one ends. Merging a 3-token prompt
    keeps only the short row's own slots (compacted from 6 to 3) and the next step's logits of
    both rows equal each sequence computed alone."""
    long, short, joining = [9, 8, 7, 6, 5, 4], [3, 2], [11, 12, 13]
    batch = KVCache(model.cfg, 2, 8, "cpu", torch.float32, starts=torch.tensor([0, 4]))
    with torch.inference_mode():
        last_logits(model, torch.tensor([long, [0] * 4 + short]), batch)
        batch.keep(torch.tensor([1]))
        alone = KVCache(model.cfg, 1, 3, "cpu", torch.float32)
        last_logits(model, torch.tensor([joining]), alone)
        merged = merge_caches(model, batch, [(alone, 1)], 2, torch.device("cpu"), torch.float32)
        assert merged.length == 3 and merged.max_len == 5
        assert merged.starts is not None and merged.starts.tolist() == [1, 0]
        step = last_logits(model, torch.tensor([[21], [22]]), merged)
        for row, seq in enumerate([[*short, 21], [*joining, 22]]):
            fresh = KVCache(model.cfg, 1, len(seq), "cpu", torch.float32)
            expected = last_logits(model, torch.tensor([seq]), fresh)
            torch.testing.assert_close(step[row : row + 1], expected, atol=1e-5, rtol=1e-5)


def test_rows_leave_at_stop_ids_finished_and_cancel(model: Llama) -> None:
    alone = generate(model, PROMPT, GREEDY)
    stop = alone[4]
    batcher = ContinuousBatcher(model)
    with slowed(model, 0.005):
        stopped = batcher.submit(PROMPT, GREEDY, stop_ids={stop})
        cut = batcher.submit(PROMPT, GREEDY, n=2, finished=lambda s, ids: len(ids) == 3 + s)
        cancelled = batcher.submit(PROMPT, GREEDY)
        stream = cancelled.tokens()
        next(stream)
        stream.close()  # the client went away
        assert stopped.samples() == [alone[: alone.index(stop) + 1]]
        assert cut.samples() == [alone[:3], alone[:4]]
        assert len(cancelled.samples()[0]) < 10  # at most the steps already under way
    batcher.close()


def test_a_failed_step_fails_its_requests_and_the_batcher_goes_on(model: Llama) -> None:
    def fail(*_: object) -> None:
        raise RuntimeError("injected")

    batcher = ContinuousBatcher(model)
    handle = model.lm_head.register_forward_pre_hook(fail)
    try:
        request = batcher.submit(PROMPT, GREEDY)
        with pytest.raises(RuntimeError, match="batching thread") as failure:
            request.samples()
        assert "injected" in str(failure.value.__cause__)
    finally:
        handle.remove()
    assert batcher.submit(PROMPT, GREEDY).samples() == [generate(model, PROMPT, GREEDY)]
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(PROMPT, GREEDY)


def test_a_request_that_fails_between_prefill_and_batch_gets_the_error(
    model: Llama, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt prefilled in chunks over several steps whose merge into the batch fails: it
    and the request already decoding both get the error rather than waiting forever."""
    merges = []

    def merge_once(*args: Any) -> KVCache:
        merges.append(args)
        if len(merges) > 1:
            raise MemoryError("no room for the merged cache")
        return merge_caches(*args)

    monkeypatch.setattr(batching, "merge_caches", merge_once)
    batcher = ContinuousBatcher(model, prefill_chunk=2)
    with slowed(model, 0.005), ThreadPoolExecutor(2) as pool:
        first = batcher.submit(PROMPT, GREEDY).tokens()
        next(first)  # decoding
        late = batcher.submit(list(range(1, 12)), GREEDY)  # six steps of prefill
        for waiting in (pool.submit(late.samples), pool.submit(list, first)):
            with pytest.raises(RuntimeError, match="batching thread"):
                waiting.result(timeout=30)
    assert len(merges) == 2
    batcher.close()


def test_a_failing_finished_callback_fails_only_its_own_request(model: Llama) -> None:
    def broken(sample: int, ids: list[int]) -> bool:
        raise KeyError("bad stop check")

    batcher = ContinuousBatcher(model)
    with slowed(model, 0.005):
        good = batcher.submit(PROMPT, GREEDY)
        bad = batcher.submit(PROMPT, GREEDY, n=2, finished=broken)
        with pytest.raises(RuntimeError, match="batching thread") as failure:
            bad.samples()
        assert isinstance(failure.value.__cause__, KeyError)
        assert good.samples() == [generate(model, PROMPT, GREEDY)]
    batcher.close()


def test_sampling_that_fails_fails_only_the_requests_sampled_that_way(
    model: Llama, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows are sampled in groups of equal settings; a group that raises ends its requests
    (every sample) with the error, and the rest of the batch decodes on."""
    real = batching.sample_rows

    def picky(logits: torch.Tensor, cfg: GenerateConfig, gens: Any) -> torch.Tensor:
        if cfg.temperature == 0.5:
            raise FloatingPointError("probabilities are not finite")
        return real(logits, cfg, gens)

    monkeypatch.setattr(batching, "sample_rows", picky)
    batcher = ContinuousBatcher(model)
    with slowed(model, 0.005):
        good = batcher.submit(PROMPT, GREEDY)
        bad = batcher.submit(PROMPT, GenerateConfig(max_new_tokens=9, temperature=0.5), n=2)
        with pytest.raises(RuntimeError, match="batching thread") as failure:
            bad.samples()
        assert isinstance(failure.value.__cause__, FloatingPointError)
        assert good.samples() == [generate(model, PROMPT, GREEDY)]
    batcher.close()


def test_edge_cases_get_answers_or_clear_errors(model: Llama) -> None:
    batcher = ContinuousBatcher(model)
    none = GenerateConfig(max_new_tokens=0)
    assert batcher.submit(PROMPT, none, n=2).samples() == [[], []]
    assert list(batcher.submit(PROMPT, none).tokens()) == []
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        batcher.submit([], GREEDY)
    with pytest.raises(ValueError, match="n must be >= 1"):
        batcher.submit(PROMPT, GREEDY, n=0)
    with pytest.raises(ValueError, match="n = 2"):
        batcher.submit(PROMPT, none, n=2).tokens()
    with pytest.raises(ValueError, match="prefill_chunk"):
        ContinuousBatcher(model, prefill_chunk=0)
    batcher.close()  # never started a thread
