"""Log-likelihood scoring: the shared-prefix path equals scoring each full sequence alone."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lmforge.eval.multiple_choice import (
    ChoiceScore,
    LoglikelihoodScorer,
    encode_pair,
    mc_metrics,
)
from lmforge.model.config import ModelConfig
from lmforge.model.llama import Llama

BOS = 1


@dataclass(frozen=True)
class Req:
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    choice_texts: tuple[str, ...]


def char_encode(text: str) -> list[int]:
    return [5 + ord(c) % 90 for c in text]


@pytest.fixture(scope="module")
def model(tiny_cfg_module: ModelConfig) -> Llama:
    torch.manual_seed(0)
    return Llama(tiny_cfg_module).eval()


@pytest.fixture(scope="module")
def tiny_cfg_module() -> ModelConfig:
    return ModelConfig(
        vocab_size=97, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, d_ff=96
    )


@torch.no_grad()
def brute_force(model: Llama, context: list[int], cont: list[int], max_length: int) -> float:
    """Sum of log p(cont | BOS context) from one plain forward over the whole sequence."""
    seq = ([BOS, *context, *cont])[-(max_length + 1) :]
    logp = model(torch.tensor([seq[:-1]])).float().log_softmax(-1)[0]
    n = len(cont)
    targets = torch.tensor(seq[-n:])
    return float(logp[-n:].gather(-1, targets[:, None]).sum())


def test_encode_pair_moves_trailing_space_to_the_continuation() -> None:
    assert encode_pair(char_encode, "Answer: ", "Paris") == (
        char_encode("Answer:"),
        char_encode(" Paris"),
    )
    assert encode_pair(char_encode, "Q", " A") == (char_encode("Q"), char_encode(" A"))


@pytest.mark.parametrize("max_length", [512, 12])
def test_shared_prefix_scores_equal_each_sequence_alone(model: Llama, max_length: int) -> None:
    scorer = LoglikelihoodScorer(model, char_encode, BOS, max_length, torch.device("cpu"))
    req = Req(
        contexts=("Question: which is red?\nAnswer:",) * 4,
        continuations=(" a tomato", " the sky", " grass", " x"),
        gold=0,
        choice_texts=(" a tomato", " the sky", " grass", " x"),
    )
    scores = scorer.score([req])[0]
    for cont, s in zip(req.continuations, scores, strict=True):
        ctx, c = encode_pair(char_encode, req.contexts[0], cont)
        assert s.num_tokens == len(c)
        assert math.isclose(s.logprob, brute_force(model, ctx, c, max_length), abs_tol=1e-3)


def test_choices_with_their_own_contexts(model: Llama) -> None:
    """Winogrande: the blank filled in the context, one shared continuation."""
    scorer = LoglikelihoodScorer(model, char_encode, BOS, 512, torch.device("cpu"))
    req = Req(("The cat sat", "The dog sat"), (" on the mat.", " on the mat."), 1, ("a", "b"))
    scores = scorer.score([req])[0]
    for ctx_text, s in zip(req.contexts, scores, strict=True):
        ctx, c = encode_pair(char_encode, ctx_text, " on the mat.")
        assert math.isclose(s.logprob, brute_force(model, ctx, c, 512), abs_tol=1e-3)


def test_many_questions_batched_equal_each_alone(model: Llama) -> None:
    """Rows of different lengths and choice counts padded into one batch, or a batch each."""
    words = ["red", "a tomato", "the sky at night", "x", "grass", "stone walls", "?"]
    reqs = []
    for q in range(12):
        k = 2 + q % 3
        conts = tuple(" " + words[(q + j) % len(words)] for j in range(k))
        context = f"Q{q}: " + "which one " * (q % 4) + "is it?\nAnswer:"
        reqs.append(Req((context,) * k, conts, 0, conts))
    one_batch = LoglikelihoodScorer(model, char_encode, BOS, 40, torch.device("cpu"))
    one_each = LoglikelihoodScorer(model, char_encode, BOS, 40, torch.device("cpu"), batch_tokens=1)
    batched, alone = one_batch.score(reqs), one_each.score(reqs)
    for req, row_b, row_a in zip(reqs, batched, alone, strict=True):
        assert len(row_b) == len(req.continuations)
        for cont, b, a in zip(req.continuations, row_b, row_a, strict=True):
            ctx, c = encode_pair(char_encode, req.contexts[0], cont)
            assert math.isclose(b.logprob, a.logprob, abs_tol=1e-4)
            assert math.isclose(b.logprob, brute_force(model, ctx, c, 40), abs_tol=1e-3)
            assert b.greedy == a.greedy and b.num_tokens == len(c)


def test_greedy_flag_and_bf16_close_to_fp32(model: Llama) -> None:
    ctx = "abcabcabc"
    with torch.no_grad():
        logits = model(torch.tensor([[BOS, *char_encode(ctx)]]))[0, -1]
    best = int(logits.argmax())
    best_char = next(chr(o) for o in range(32, 127) if 5 + o % 90 == best)
    req = Req((ctx, ctx), (best_char, "~"), 0, ("a", "b"))
    fp32 = LoglikelihoodScorer(model, char_encode, BOS, 64, torch.device("cpu")).score([req])[0]
    assert fp32[0].greedy
    bf16 = LoglikelihoodScorer(
        model, char_encode, BOS, 64, torch.device("cpu"), amp_dtype=torch.bfloat16
    ).score([req])[0]
    for a, b in zip(fp32, bf16, strict=True):
        assert math.isclose(a.logprob, b.logprob, abs_tol=0.05)


def test_metrics_by_hand() -> None:
    def s(*lps: float) -> list[ChoiceScore]:
        return [ChoiceScore(lp, False, 1) for lp in lps]

    reqs = [
        Req(("",) * 2, ("", ""), 0, ("ab", "abcdefgh")),  # -2 vs -3: acc picks 0; /len: 1
        Req(("",) * 2, ("", ""), 1, ("é", "ee")),  # -1 vs -1.5: acc 0; chars 1 vs 2 → 1; bytes tie
        Req(("",) * 3, ("", "", ""), 2, ("a", "b", "c")),  # tie everywhere → first index (wrong)
    ]
    scores = [s(-2.0, -3.0), s(-1.0, -1.5), s(-1.0, -1.0, -1.0)]
    m = mc_metrics(reqs, scores)
    assert m["acc"] == pytest.approx(1 / 3)  # only request 0
    assert m["acc_norm"] == pytest.approx(1 / 3)  # only request 1: -0.75 > -1 and -1/1
    assert m["acc_bytes"] == pytest.approx(0.0)  # request 1: -1/2 vs -1.5/2 → 0; tie → 0
    # stderr of [1, 0, 0]: sample std sqrt(1/3) over sqrt(3)
    assert m["acc_stderr"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))
    # an empty choice text divides by zero as lm-eval's numpy does: -x/0 = -inf loses
    empty = Req(("",) * 2, ("", " "), 1, ("", "no"))
    assert mc_metrics([empty], [s(-1.0, -5.0)])["acc_norm"] == 1.0
    with pytest.raises(ValueError, match="no requests"):
        mc_metrics([], [])


def test_an_answer_longer_than_the_context_names_the_task(model: Llama, tmp_path: Path) -> None:
    import json
    from types import SimpleNamespace

    from lmforge.eval.suite import SuiteConfig, run_suite

    (tmp_path / "copa").mkdir()
    row = {"premise": "It rained.", "choice1": "The street got wet " * 5, "choice2": "Sun.",
           "question": "effect", "idx": 0, "label": 0}  # fmt: skip
    (tmp_path / "copa" / "validation.jsonl").write_text(json.dumps(row) + "\n")
    tok = SimpleNamespace(
        encode=char_encode, bos_id=BOS, encode_batch=lambda ts: [char_encode(t) for t in ts]
    )
    cfg = SuiteConfig(tasks=("copa",), data_dir=str(tmp_path), max_length=32)
    too_long = (
        r"copa: .*validation\.jsonl:1: choice 0 continues for \d+ tokens, more than max_length 32"
    )
    with pytest.raises(ValueError, match=too_long):
        run_suite(model, tok, torch.device("cpu"), cfg)  # type: ignore[arg-type]
    scored = run_suite(model, tok, torch.device("cpu"), SuiteConfig(tasks=("copa",),
        data_dir=str(tmp_path), max_length=128))["tasks"]["copa"]  # fmt: skip
    assert (scored["n"], scored["data"]) == (1, [str(tmp_path / "copa" / "validation.jsonl")])
