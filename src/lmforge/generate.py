"""Text generation: pick the next token (greedy, temperature, top-k, top-p), decode with a KV cache.

One prompt at a time: prefill the prompt in one forward pass, then feed one token per step.
Several samples of one prompt (HumanEval's pass@k) decode together: the prompt is prefilled
once, and each step multiplies the weights by all samples' tokens at once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Protocol

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
    with dynamic shapes, serves every prompt and cache length. On a 2-core CPU it took 18-30 s
    and then decoded 1.08x (fp32) to 1.16x (bf16) faster (benchmarks/notes/decode.md): worth
    it in a server or a long generation, not a short one."""

    def __post_init__(self) -> None:
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


def sample_next(
    logits: torch.Tensor, cfg: GenerateConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V).

    Greedy at temperature 0; else scale by temperature, filter top-k then top-p, and sample.
    """
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None:
        logits = _top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None and cfg.top_p < 1:
        logits = _top_p_filter(logits, cfg.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _last_logits(model: Llama, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (B, V) of the last position only, appending ids (B, T) to the cache."""
    hidden = model.hidden_states(ids, cache=cache)  # (B, T, d)
    return model.lm_head(hidden[:, -1])


@functools.cache
def _compiled_last_logits() -> Callable[[Llama, torch.Tensor, KVCache], torch.Tensor]:
    """`_last_logits` under torch.compile, built once per process."""
    return torch.compile(_last_logits, dynamic=True)


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
    if not prompt_ids:
        raise ValueError("generate: prompt_ids is empty; pass at least one token (e.g. the BOS id)")
    if cfg.max_new_tokens == 0:
        return
    param = next(model.parameters())
    if generator is None:
        generator = torch.Generator(device=param.device).manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(
            model.cfg, 1, len(prompt_ids) + cfg.max_new_tokens, param.device, param.dtype
        )
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=param.device)
        step = _compiled_last_logits() if cfg.compile else _last_logits
        logits = _last_logits(model, ids, cache)  # the prefill: a new shape per prompt, eager
        for left in reversed(range(cfg.max_new_tokens)):  # tokens allowed after this one
            token = sample_next(logits, cfg, generator)  # (1,)
            yield int(token.item())
            if int(token.item()) in stop_ids or not left:
                break
            logits = step(model, token.view(1, 1), cache)
    finally:
        model.train(was_training)


@torch.inference_mode()
def generate_samples(
    model: Llama,
    prompt_ids: list[int],
    n: int,
    cfg: GenerateConfig,
    stop_ids: Collection[int] = (),
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """n samples of new token ids after one prompt, as `generate` makes one, decoded as a batch.

    The prompt is prefilled once and its keys/values copied to n cache rows. Each step then
    reads the weights once for n tokens, where n `generate` calls read them n times: 3.8x the
    tokens per second at n = 10 on a 2-core CPU (benchmarks/sample_throughput.py). A sample ends at
    its first stop id; the batch runs until every sample has ended or max_new_tokens.
    """
    if n < 1:
        raise ValueError(f"generate_samples: n must be >= 1, got {n}")
    if not prompt_ids:
        raise ValueError("generate: prompt_ids is empty; pass at least one token (e.g. the BOS id)")
    if cfg.max_new_tokens == 0:
        return [[] for _ in range(n)]
    param = next(model.parameters())
    if generator is None:
        generator = torch.Generator(device=param.device).manual_seed(cfg.seed)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=param.device)
    was_training = model.training
    model.eval()
    try:
        max_len = len(prompt_ids) + cfg.max_new_tokens
        prompt = KVCache(model.cfg, 1, max_len, param.device, param.dtype)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=param.device)
        logits = _last_logits(model, ids, prompt).expand(n, -1)  # the prefill, once
        cache = KVCache(model.cfg, n, max_len, param.device, param.dtype)
        cache.k[..., : prompt.length, :] = prompt.k[..., : prompt.length, :]  # to every row
        cache.v[..., : prompt.length, :] = prompt.v[..., : prompt.length, :]
        cache.length = prompt.length
        del prompt
        step = _compiled_last_logits() if cfg.compile else _last_logits
        tokens, ended = [], torch.zeros(n, dtype=torch.bool, device=param.device)
        for left in reversed(range(cfg.max_new_tokens)):
            token = sample_next(logits, cfg, generator)  # (n,)
            tokens.append(token)
            ended |= torch.isin(token, stops)
            if not left or bool(ended.all()):
                break
            logits = step(model, token[:, None], cache)
    finally:
        model.train(was_training)
    samples = torch.stack(tokens, dim=1).tolist()  # (n, steps)
    return [_cut_after_stop(sample, stop_ids) for sample in samples]


def _cut_after_stop(ids: list[int], stop_ids: Collection[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[: i + 1]
    return ids


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
    if new and new[-1] == tokenizer.eos_id:
        new = new[:-1]
    return tokenizer.decode(new)


def generate_texts(
    model: Llama,
    tokenizer: TokenizerLike,
    prompt: str,
    n: int,
    cfg: GenerateConfig,
    generator: torch.Generator | None = None,
) -> list[str]:
    """n continuations of one prompt, as `generate_text` makes one, decoded as a batch."""
    prompt_ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
    samples = generate_samples(model, prompt_ids, n, cfg, (tokenizer.eos_id,), generator)
    return [tokenizer.decode(s[:-1] if s and s[-1] == tokenizer.eos_id else s) for s in samples]
