"""Multiple-choice scoring by log-likelihood, as lm-evaluation-harness scores it.

Each choice is a (context, continuation) pair; its score is the summed log-probability of the
continuation's tokens given the context. Tokenization follows lm-eval's rule: trailing spaces of
the context move to the continuation, the pair is encoded whole, and the continuation is what
follows the context's own tokens. The context is run once for all its choices: each row is a
tree, the context followed by every continuation, each continuation attending to the context
and itself only. So a 4-way question with a long few-shot prompt costs one context's worth of
compute, not four, and many questions share one forward pass.

Metrics (lm-eval's names): acc = argmax of the summed log-probability; acc_norm = argmax of it
divided by the choice text's length in characters; acc_bytes = divided by its UTF-8 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

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


@dataclass(frozen=True)
class Tree:
    """One context and the continuations scored after it: a row `prefix c1[:-1] c2[:-1] ...`
    whose continuations see the prefix and themselves, never each other."""

    prefix: list[int]
    """Context tokens (BOS first), already truncated to the window."""
    conts: list[list[int]]

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(c) - 1 for c in self.conts)


class LoglikelihoodScorer:
    """Scores choices with a model; `prefix_id` (BOS) starts every context, as in training.

    Rows are trees (see `Tree`): the context runs once for all its choices. Trees are sorted by
    length and batched up to `batch_tokens` (rows × longest row), so small models run many
    questions per forward pass instead of paying per-question overhead.
    """

    def __init__(
        self,
        model: Llama,
        encode: Callable[[str], list[int]],
        prefix_id: int,
        max_length: int,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        batch_tokens: int = 8192,
        encode_batch: Callable[[list[str]], list[list[int]]] | None = None,
    ) -> None:
        self.model, self.encode, self.prefix_id = model.eval(), encode, prefix_id
        self.max_length, self.device, self.amp_dtype = max_length, device, amp_dtype
        self.batch_tokens = batch_tokens
        self.encode_batch = encode_batch or (lambda texts: [encode(t) for t in texts])
        """Many texts at once (e.g. the tokenizer's multi-threaded batch encode)."""

    def score(self, requests: Sequence[McRequest], desc: str = "score") -> list[list[ChoiceScore]]:
        """Scores of every choice of every request, in order."""
        texts = {  # everything encode_pair will encode, encoded once and in parallel
            t
            for request in requests
            for c, x in zip(request.contexts, request.continuations, strict=True)
            for t in (c.rstrip(), c + x)
        }
        table = dict(zip(texts, self.encode_batch(list(texts)), strict=True))
        trees: list[Tree] = []
        slots: list[list[tuple[int, int]]] = []  # (request, choice) of each tree's continuations
        for r, request in enumerate(requests):
            for tree, choices in self._trees(request, table.__getitem__):
                trees.append(tree)
                slots.append([(r, c) for c in choices])
        out: list[list[ChoiceScore | None]] = [[None] * len(r.contexts) for r in requests]
        for t, scores in enumerate(self.score_trees(trees, desc)):
            for (r, c), score in zip(slots[t], scores, strict=True):
                out[r][c] = score
        return [[s for s in row if s is not None] for row in out]

    def score_request(self, request: McRequest) -> list[ChoiceScore]:
        return self.score([request])[0]

    def score_tokens(self, prefix: list[int], conts: list[list[int]]) -> list[ChoiceScore]:
        """Token continuations of one token prefix (BOS included, already truncated)."""
        return self.score_trees([Tree(prefix, conts)])[0]

    def _trees(
        self, request: McRequest, encode: Callable[[str], list[int]]
    ) -> list[tuple[Tree, list[int]]]:
        """The request's choices grouped by their (truncated) context, lm-eval's tokenization."""
        pairs = [
            encode_pair(encode, c, x)
            for c, x in zip(request.contexts, request.continuations, strict=True)
        ]
        groups: dict[tuple[int, ...], list[int]] = {}
        where = getattr(request, "where", "") or "a request"
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError(f"{where}: choice {i} has no continuation tokens")
            if len(cont) > self.max_length:
                raise ValueError(
                    f"{where}: choice {i} continues for {len(cont)} tokens, more than"
                    f" max_length {self.max_length} (the model's context)"
                )
            # lm-eval's window: the last max_length + 1 tokens of prefix + continuation
            window = [self.prefix_id, *ctx][-(self.max_length + 1 - len(cont)) :]
            groups.setdefault(tuple(window), []).append(i)
        return [(Tree(list(k), [pairs[i][1] for i in m]), m) for k, m in groups.items()]

    @torch.no_grad()
    def score_trees(self, trees: Sequence[Tree], desc: str = "score") -> list[list[ChoiceScore]]:
        """Scores of each tree's continuations, longest trees first in batches."""
        order = sorted(range(len(trees)), key=lambda i: -trees[i].length)
        out: list[list[ChoiceScore]] = [[] for _ in trees]
        bar = tqdm(total=len(trees), desc=desc, unit="ctx", disable=not _tty(), leave=False)
        i = 0
        while i < len(order):
            rows = max(1, self.batch_tokens // trees[order[i]].length)
            batch = order[i : i + rows]
            for t, scores in zip(batch, self._forward([trees[t] for t in batch]), strict=True):
                out[t] = scores
            bar.update(len(batch))
            i += len(batch)
        bar.close()
        return out

    def _forward(self, trees: list[Tree]) -> list[list[ChoiceScore]]:
        """One forward pass over tree rows; the head runs only where a prediction is needed."""
        T = max(t.length for t in trees)
        ids = torch.full((len(trees), T), self.prefix_id, dtype=torch.long)
        positions = torch.zeros((len(trees), T), dtype=torch.long)
        segment = torch.full((len(trees), T), -1, dtype=torch.long)  # -1: padding
        where: list[int] = []  # flat (row * T + column) of the hidden state predicting a target
        targets: list[int] = []
        for b, tree in enumerate(trees):
            P = len(tree.prefix)
            ids[b, :P] = torch.tensor(tree.prefix)
            positions[b, :P] = torch.arange(P)
            segment[b, :P] = 0
            col = P
            for k, cont in enumerate(tree.conts, start=1):
                m = len(cont) - 1  # the last token is only a target
                ids[b, col : col + m] = torch.tensor(cont[:-1], dtype=torch.long)
                positions[b, col : col + m] = torch.arange(P, P + m)
                segment[b, col : col + m] = k
                where += [b * T + P - 1] + [b * T + c for c in range(col, col + m)]
                targets += cont
                col += m
        with self._autocast():
            if all(sum(len(c) > 1 for c in t.conts) <= 1 for t in trees):
                # at most one continuation past its first token per row: plain causal rows
                hidden = self.model.hidden_states(ids.to(self.device))
            else:
                causal = torch.ones(T, T, dtype=torch.bool).tril()
                seen = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
                mask = (causal & seen)[:, None]  # padding sees the prefix and itself
                hidden = self.model.hidden_states(
                    ids.to(self.device),
                    positions.to(self.device),
                    attention_mask=mask.to(self.device),
                )
            picked = hidden.flatten(0, 1)[torch.tensor(where, device=self.device)]
            logprobs = self.model.lm_head(picked).float().log_softmax(-1)
        target = torch.tensor(targets, device=self.device)
        chosen = logprobs.gather(-1, target[:, None])[:, 0].tolist()
        greedy = (logprobs.argmax(-1) == target).tolist()
        out, at = [], 0
        for tree in trees:
            scores = []
            for cont in tree.conts:
                n = len(cont)
                scores.append(ChoiceScore(sum(chosen[at : at + n]), all(greedy[at : at + n]), n))
                at += n
            out.append(scores)
        return out

    def _autocast(self) -> torch.autocast:
        dtype = self.amp_dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp_dtype is not None)


def mc_metrics(
    requests: Sequence[McRequest], scores: Sequence[Sequence[ChoiceScore]]
) -> dict[str, float]:
    """acc, acc_norm, acc_bytes and their standard errors (sample std / sqrt(n), as lm-eval)."""
    hits: dict[str, list[float]] = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for request, choice_scores in zip(requests, scores, strict=True):
        lp = np.array([s.logprob for s in choice_scores])
        chars = np.array([len(t) for t in request.choice_texts], dtype=np.float64)
        nbytes = np.array([len(t.encode("utf-8")) for t in request.choice_texts], np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):  # an empty choice text: -inf/nan,
            norm, per_byte = lp / chars, lp / nbytes  # as in lm-eval, not an error
        hits["acc"].append(float(np.argmax(lp) == request.gold))
        hits["acc_norm"].append(float(np.argmax(norm) == request.gold))
        hits["acc_bytes"].append(float(np.argmax(per_byte) == request.gold))
    if not hits["acc"]:
        raise ValueError("mc_metrics: no requests to score")
    out: dict[str, float] = {}
    for name, values in hits.items():
        out[name] = sum(values) / len(values)
        out[f"{name}_stderr"] = _stderr(values)
    return out


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
