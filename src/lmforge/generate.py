"""Text generation: pick the next token (greedy, temperature, top-k, top-p), decode with a KV cache.

One prompt: prefill the prompt in one forward pass, then feed one token per step. Several
sequences decode as one batch, so each step reads the weights once for all of them: n samples
of one prompt (HumanEval's pass@k; the prompt is prefilled once) or one continuation of each of
several prompts (left-padded). Each row samples with its own generator, so what a row draws
does not depend on its batch: row i equals `generate` with seed cfg.seed + i.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lmforge.model.attention import KVCache
from lmforge.model.llama import Llama

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    max_new_tokens: int = 64
    """Most tokens to generate after the prompt (a stop token, if hit, counts as one)."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy (argmax), ignoring top_k and top_p."""
    top_k: int | None = 50
    """Sample only among the k most likely tokens; None keeps all."""
    top_p: float | None = 0.95
    """Nucleus: keep the fewest top tokens whose probability reaches top_p; None keeps all."""
    seed: int = 0
    """Seed of the sampling generator when the caller passes none."""
    compile: bool = False
    """torch.compile the one-token decode step (the prompt's prefill stays eager). One compile,
    with dynamic shapes, serves every prompt and cache length. On a 2-core Intel Xeon it took
    18-30 s and then decoded 1.08x (fp32) to 1.16x (bf16) faster; on a 2-core AMD EPYC ~2x in
    fp32 at batch 1 (inductor's own kernel for one-row products reads the weights faster there
    than MKL or oneDNN) and 1.2-1.3x at 4-8 rows (benchmarks/notes/decode.md §9-10): worth it
    in a server or a long generation, not a short one."""

    def __post_init__(self) -> None:
        if not -(2**63) <= self.seed < 2**63:  # so that every row's seed + i fits a generator
            raise ValueError(f"generate.seed must be in [-2**63, 2**63), got {self.seed}")
        if self.max_new_tokens < 0:
            raise ValueError(f"generate.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(
                f"generate.temperature must be >= 0 (0 = greedy), got {self.temperature}"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"generate.top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"generate.top_p must be in (0, 1] or None, got {self.top_p}")


class TokenizerLike(Protocol):
    """What `generate_text` needs from a tokenizer."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...


def _top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties at the k-th are kept)."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability sums to p; the top one always stays."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _filtered_probs(logits: torch.Tensor, cfg: GenerateConfig) -> torch.Tensor:
    """Probabilities (B, V) after temperature, top-k, then top-p (cfg.temperature > 0).

    The row's largest logit is subtracted before dividing: at a tiny temperature (1e-40) the
    quotient would otherwise overflow to inf, and softmax turn inf - inf into NaN."""
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / cfg.temperature
    if cfg.top_k is not None:
        logits = _top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None and cfg.top_p < 1:
        logits = _top_p_filter(logits, cfg.top_p)
    return logits.softmax(dim=-1)


def sample_next(
    logits: torch.Tensor, cfg: GenerateConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V).

    Greedy at temperature 0; else scale by temperature, filter top-k then top-p, and sample.
    """
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = _filtered_probs(logits, cfg)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def sample_rows(
    logits: torch.Tensor, cfg: GenerateConfig, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """`sample_next` with one generator per row: a row draws what it would draw alone, whatever
    the other rows of the batch are (or whether they are still there)."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = _filtered_probs(logits, cfg)
    draws = [
        torch.multinomial(probs[i : i + 1], num_samples=1, generator=g)
        for i, g in enumerate(generators)
    ]
    return torch.cat(draws).squeeze(-1)


def last_logits(model: Llama, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (B, V) of the last position only, appending ids (B, T) to the cache."""
    hidden = model.hidden_states(ids, cache=cache)  # (B, T, d)
    return model.lm_head(hidden[:, -1])


@functools.cache
def _compiled_last_logits(
    cpp_wrapper: bool,
) -> Callable[[Llama, torch.Tensor, KVCache], torch.Tensor]:
    """`last_logits` under torch.compile, built once per process (and wrapper kind).

    By default inductor inlined each RMSNorm (and SwiGLU's silu(gate)·up) into the next
    one-row product, recomputing it for every output row: the head's kernel then did the
    final norm's arithmetic 32,000 times and ran compute-bound. Realizing every pointwise
    result (`realize_opcount_threshold` 1) leaves each product one multiply-add per weight:
    batch-1 decoding 69.5 -> 75.1 tok/s, 8 rows level (benchmarks/notes/decode.md §10).

    On CPU the kernels are called from generated C++ rather than Python (`cpp_wrapper`): a
    one-token step is ~100 small calls, and their Python glue cost 10% of batch-1 decoding on
    an AMX Xeon (bf16 214 -> 238 tok/s, fp32 149 -> 165; notes §12), for a longer first
    compile."""
    import torch._inductor.config as inductor_config

    options: dict[str, str | int | bool | Callable[..., Any]] = {}
    if hasattr(inductor_config, "realize_opcount_threshold"):  # absent in other versions
        options["realize_opcount_threshold"] = 1
    if cpp_wrapper:
        options["cpp_wrapper"] = True
    return torch.compile(last_logits, dynamic=True, options=options)


def decode_step(
    model: Llama, compile: bool
) -> Callable[[Llama, torch.Tensor, KVCache], torch.Tensor]:
    """The one-token decode step of a model: `last_logits`, or its compiled twin
    (`GenerateConfig.compile`)."""
    if not compile:
        return last_logits
    return _compiled_last_logits(next(model.parameters()).device.type == "cpu")


def generate(
    model: Llama,
    prompt_ids: list[int],
    cfg: GenerateConfig,
    stop_ids: Collection[int] = (),
    generator: torch.Generator | None = None,
) -> list[int]:
    """New token ids after prompt_ids: at most cfg.max_new_tokens, ending at a stop id if hit."""
    new = list(generate_stream(model, prompt_ids, cfg, stop_ids, generator))
    log.debug("generated %d tokens after a %d-token prompt", len(new), len(prompt_ids))
    return new


@torch.inference_mode()
def generate_stream(
    model: Llama,
    prompt_ids: list[int],
    cfg: GenerateConfig,
    stop_ids: Collection[int] = (),
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """`generate`, one token id at a time as each is sampled (chat and server stream them)."""
    check_prompts([prompt_ids])
    if cfg.max_new_tokens == 0:
        return
    param = next(model.parameters())
    if generator is None:
        generator = torch.Generator(device=param.device).manual_seed(cfg.seed)
    with _eval_mode(model):
        cache = KVCache(
            model.cfg, 1, len(prompt_ids) + cfg.max_new_tokens, param.device, param.dtype
        )
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=param.device)
        step = decode_step(model, cfg.compile)
        logits = last_logits(model, ids, cache)  # the prefill: a new shape per prompt, eager
        for left in reversed(range(cfg.max_new_tokens)):  # tokens allowed after this one
            token = sample_next(logits, cfg, generator)  # (1,)
            yield int(token.item())
            if int(token.item()) in stop_ids or not left:
                break
            logits = step(model, token.view(1, 1), cache)


Finished = Callable[[int, list[int]], bool]
"""finished(row, new_ids) -> True once that row should stop (e.g. its text reached a stop
string); called after every token a row gets, before the next step."""


@torch.inference_mode()
def generate_samples(
    model: Llama,
    prompt_ids: list[int],
    n: int,
    cfg: GenerateConfig,
    stop_ids: Collection[int] = (),
    finished: Finished | None = None,
) -> list[list[int]]:
    """n samples of new token ids after one prompt, decoded as a batch: sample i is what
    `generate` draws with seed cfg.seed + i (up to the rounding of batched products).

    The prompt is prefilled once and its keys/values copied to n cache rows. Each step then
    reads the weights once for n tokens, where n `generate` calls read them n times: 3.8x the
    tokens per second at n = 10 on a 2-core CPU (benchmarks/sample_throughput.py)."""
    if n < 1:
        raise ValueError(f"generate_samples: n must be >= 1, got {n}")
    check_prompts([prompt_ids])
    if cfg.max_new_tokens == 0:
        return [[] for _ in range(n)]
    param = next(model.parameters())
    with _eval_mode(model):
        max_len = len(prompt_ids) + cfg.max_new_tokens
        prompt = KVCache(model.cfg, 1, max_len, param.device, param.dtype)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=param.device)
        logits = last_logits(model, ids, prompt).expand(n, -1)  # the prefill, once
        cache = KVCache(model.cfg, n, max_len, param.device, param.dtype)
        cache.copy_in(slice(None), 0, prompt, slice(0, 1), slice(0, prompt.length))  # every row
        cache.length = prompt.length
        del prompt
        return _decode(
            model, logits, cache, cfg, row_generators(cfg, n, param.device), stop_ids, finished
        )


@torch.inference_mode()
def generate_batch(
    model: Llama,
    prompts: Sequence[list[int]],
    cfg: GenerateConfig,
    stop_ids: Collection[int] = (),
    finished: Finished | None = None,
) -> list[list[int]]:
    """New token ids after each of several prompts, decoded as one batch: row i is what
    `generate` makes of prompts[i] with seed cfg.seed + i (up to the rounding of batched
    products).

    The prompts are left-padded to the longest and prefilled in one forward pass; the padding
    is masked and each row's positions start at its own first token (`KVCache.starts`). Each
    step reads the weights once for all rows; a row that ends leaves the batch. Callers with
    many prompts batch those of similar length together: the padding is computed, then
    discarded."""
    if not prompts:
        return []
    check_prompts(prompts)
    if cfg.max_new_tokens == 0:
        return [[] for _ in prompts]
    param = next(model.parameters())
    longest = max(len(p) for p in prompts)
    padded = [[0] * (longest - len(p)) + list(p) for p in prompts]
    starts = torch.tensor([longest - len(p) for p in prompts], device=param.device)
    with _eval_mode(model):
        cache = KVCache(
            model.cfg,
            len(prompts),
            longest + cfg.max_new_tokens,
            param.device,
            param.dtype,
            starts=starts if bool(starts.any()) else None,  # None keeps the mask-free kernels
        )
        ids = torch.tensor(padded, dtype=torch.long, device=param.device)
        logits = last_logits(model, ids, cache)  # every row's prompt ends at the last column
        generators = row_generators(cfg, len(prompts), param.device)
        return _decode(model, logits, cache, cfg, generators, stop_ids, finished)


def _decode(
    model: Llama,
    logits: torch.Tensor,
    cache: KVCache,
    cfg: GenerateConfig,
    generators: list[torch.Generator],
    stop_ids: Collection[int],
    finished: Finished | None,
) -> list[list[int]]:
    """Sample after each row's prefilled prompt (logits (B, V) of its last token) until its
    first stop id, `finished`, or cfg.max_new_tokens. Rows that end leave the batch and the
    cache, so later steps compute only the rows still going."""
    stops = set(stop_ids)
    out: list[list[int]] = [[] for _ in generators]
    rows = list(range(len(generators)))  # batch row -> index into out
    step = decode_step(model, cfg.compile)
    for left in reversed(range(cfg.max_new_tokens)):  # tokens allowed after this one
        tokens = sample_rows(logits, cfg, [generators[r] for r in rows])  # (B,)
        live = []
        for i, token in enumerate(tokens.tolist()):
            new = out[rows[i]]
            new.append(token)
            if token not in stops and not (finished is not None and finished(rows[i], new)):
                live.append(i)
        if not left or not live:
            break
        if len(live) < len(rows):
            keep = torch.tensor(live, device=tokens.device)
            cache.keep(keep)
            tokens, rows = tokens[keep], [rows[i] for i in live]
        logits = step(model, tokens[:, None], cache)
    return out


def row_generators(cfg: GenerateConfig, n: int, device: torch.device) -> list[torch.Generator]:
    """One generator per row, seeded cfg.seed + i: row i draws what `generate` draws alone."""
    return [torch.Generator(device=device).manual_seed(cfg.seed + i) for i in range(n)]


def check_prompts(prompts: Sequence[list[int]]) -> None:
    if any(not p for p in prompts):
        raise ValueError("generate: prompt_ids is empty; pass at least one token (e.g. the BOS id)")


@contextlib.contextmanager
def _eval_mode(model: Llama) -> Iterator[None]:
    """The model in eval mode for the block (no dropout), then back as it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def generate_text(
    model: Llama,
    tokenizer: TokenizerLike,
    prompt: str,
    cfg: GenerateConfig,
    generator: torch.Generator | None = None,
) -> str:
    """Continue prompt (BOS prepended) until EOS or cfg.max_new_tokens; decoded, EOS dropped."""
    prompt_ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
    new = generate(model, prompt_ids, cfg, stop_ids=(tokenizer.eos_id,), generator=generator)
    return decode_new(tokenizer, new)


def decode_new(tokenizer: TokenizerLike, new: list[int]) -> str:
    """Generated ids as text, without the EOS that ended them."""
    return tokenizer.decode(new[:-1] if new and new[-1] == tokenizer.eos_id else new)


def generate_texts(
    model: Llama,
    tokenizer: TokenizerLike,
    prompts: str | Sequence[str],
    n: int = 1,
    cfg: GenerateConfig | None = None,
    stop_texts: Sequence[str] = (),
) -> list[str]:
    """`generate_text` as one batch: n samples of one prompt (`generate_samples`), or one
    continuation of each of several prompts (`generate_batch`, n = 1). A row also ends once
    its text contains one of stop_texts (the text is returned whole: callers cut it)."""
    cfg = cfg or GenerateConfig()
    eos = tokenizer.eos_id
    finished = stop_text_check(tokenizer, stop_texts) if stop_texts else None
    if isinstance(prompts, str):
        prompt_ids = [tokenizer.bos_id, *tokenizer.encode(prompts)]
        new = generate_samples(model, prompt_ids, n, cfg, (eos,), finished)
    elif n == 1:
        batch = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
        new = generate_batch(model, batch, cfg, (eos,), finished)
    else:
        raise ValueError(f"generate_texts: n = {n} samples need one prompt, got {len(prompts)}")
    return [decode_new(tokenizer, s) for s in new]


def stop_text_check(tokenizer: TokenizerLike, stop_texts: Sequence[str]) -> Finished:
    """finished(row, ids): the text decoded so far contains a stop text."""

    def finished(row: int, ids: list[int]) -> bool:
        text = tokenizer.decode(ids)
        return any(t in text for t in stop_texts)

    return finished
