"""Multiple-choice scoring by log-likelihood, as lm-evaluation-harness scores it.

Each choice is a (context, continuation) pair; its score is the summed log-probability of the
continuation's tokens given the context. Tokenization follows lm-eval's rule: trailing spaces of
the context move to the continuation, the pair is encoded whole, and the continuation is what
follows the context's own tokens. The context is run once and its keys/values are shared by all
choices (one forward over the prefix, then all continuations in one batch), so a 4-way
question with a long few-shot prompt costs about one forward, not four.

Metrics (lm-eval's names): acc = argmax of the summed log-probability; acc_norm = argmax of it
divided by the choice text's length in characters; acc_bytes = divided by its UTF-8 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm import tqdm

from lmforge.model.attention import KVCache
from lmforge.model.llama import Llama


class McRequest(Protocol):
    """One question: a (context, continuation) pair per choice, the gold index, the choice texts
    whose lengths normalize acc_norm / acc_bytes."""

    @property
    def contexts(self) -> tuple[str, ...]: ...

    @property
    def continuations(self) -> tuple[str, ...]: ...

    @property
    def gold(self) -> int: ...

    @property
    def choice_texts(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class ChoiceScore:
    logprob: float
    """Summed log-probability of the continuation tokens."""
    greedy: bool
    """Every continuation token is the argmax (lm-eval's is_greedy)."""
    num_tokens: int


def encode_pair(
    encode: Callable[[str], list[int]], context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """lm-eval's split: move the context's trailing whitespace to the continuation, encode the
    whole text, and take as continuation the tokens after the context's own encoding."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = encode(context)
    whole = encode(context + continuation)
    return context_ids, whole[len(context_ids) :]


class LoglikelihoodScorer:
    """Scores choices with a model; `prefix_id` (BOS) starts every context, as in training."""

    def __init__(
        self,
        model: Llama,
        encode: Callable[[str], list[int]],
        prefix_id: int,
        max_length: int,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        self.model, self.encode, self.prefix_id = model.eval(), encode, prefix_id
        self.max_length, self.device, self.amp_dtype = max_length, device, amp_dtype

    def score(self, requests: Sequence[McRequest], desc: str = "score") -> list[list[ChoiceScore]]:
        bar = tqdm(requests, desc=desc, unit="q", disable=not _tty())
        return [self.score_request(r) for r in bar]

    @torch.no_grad()
    def score_request(self, request: McRequest) -> list[ChoiceScore]:
        pairs = [
            encode_pair(self.encode, c, x)
            for c, x in zip(request.contexts, request.continuations, strict=True)
        ]
        scores: list[ChoiceScore | None] = [None] * len(pairs)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError("a choice has no continuation tokens; check the task's targets")
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length")
            # lm-eval's window: the last max_length + 1 tokens of prefix + continuation
            window = [self.prefix_id, *ctx][-(self.max_length + 1 - len(cont)) :]
            groups.setdefault(tuple(window), []).append(i)
        for key, members in groups.items():
            conts = [pairs[i][1] for i in members]
            for i, s in zip(members, self.score_tokens(list(key), conts), strict=True):
                scores[i] = s
        return [s for s in scores if s is not None]

    @torch.no_grad()
    def score_tokens(self, prefix: list[int], conts: list[list[int]]) -> list[ChoiceScore]:
        """Token continuations of one token prefix (BOS included, already truncated): one
        prefix forward, then one batched forward of all continuations."""
        longest = max(len(c) for c in conts)
        dtype = self.amp_dtype or next(self.model.parameters()).dtype
        cfg = self.model.cfg
        one = KVCache(cfg, 1, len(prefix) + longest, self.device, dtype)
        with self._autocast():  # the head only where a prediction is needed: the last position
            hidden = self.model.hidden_states(torch.tensor([prefix], device=self.device), cache=one)
            first = self.model.lm_head(hidden[0, -1])
        first_lp = first.float().log_softmax(-1)
        if longest == 1:
            return [self._choice(first_lp[None], c) for c in conts]
        many = KVCache(cfg, len(conts), len(prefix) + longest, self.device, dtype)
        many.k[:, :, :, : len(prefix)] = one.k[:, :, :, : len(prefix)]
        many.v[:, :, :, : len(prefix)] = one.v[:, :, :, : len(prefix)]
        many.length = len(prefix)
        pad = self.prefix_id  # after the real tokens, causal: never seen by them
        rows = [c[:-1] + [pad] * (longest - len(c)) for c in conts]
        with self._autocast():
            rest = self.model(torch.tensor(rows, device=self.device), cache=many)
        rest_lp = rest.float().log_softmax(-1)
        return [
            self._choice(torch.cat([first_lp[None], rest_lp[i, : len(c) - 1]]), c)
            for i, c in enumerate(conts)
        ]

    @staticmethod
    def _choice(logprobs: torch.Tensor, cont: list[int]) -> ChoiceScore:
        target = torch.tensor(cont, device=logprobs.device)
        picked = logprobs.gather(-1, target[:, None])[:, 0]
        greedy = bool((logprobs.argmax(-1) == target).all())
        return ChoiceScore(float(picked.sum()), greedy, len(cont))

    def _autocast(self) -> torch.autocast:
        dtype = self.amp_dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp_dtype is not None)


def mc_metrics(
    requests: Sequence[McRequest], scores: Sequence[Sequence[ChoiceScore]]
) -> dict[str, float]:
    """acc, acc_norm, acc_bytes and their standard errors (sample std / sqrt(n), as lm-eval)."""
    hits: dict[str, list[float]] = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for request, choice_scores in zip(requests, scores, strict=True):
        lp = [s.logprob for s in choice_scores]
        chars = [len(t) for t in request.choice_texts]
        nbytes = [len(t.encode("utf-8")) for t in request.choice_texts]
        hits["acc"].append(float(_argmax(lp) == request.gold))
        hits["acc_norm"].append(
            float(_argmax([x / n for x, n in zip(lp, chars, strict=True)]) == request.gold)
        )
        hits["acc_bytes"].append(
            float(_argmax([x / n for x, n in zip(lp, nbytes, strict=True)]) == request.gold)
        )
    out: dict[str, float] = {}
    for name, values in hits.items():
        out[name] = sum(values) / len(values)
        out[f"{name}_stderr"] = _stderr(values)
    return out


def _argmax(xs: Sequence[float]) -> int:
    """First index of the maximum (numpy's tie rule, which lm-eval relies on)."""
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def _stderr(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def _tty() -> bool:
    import sys

    return sys.stderr.isatty()
