"""Sampling rules and KV-cached decoding of lmforge.generate."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from lmforge.generate import (
    GenerateConfig,
    generate,
    generate_batch,
    generate_samples,
    generate_text,
    generate_texts,
    sample_next,
)
from lmforge.model.attention import KVCache
from lmforge.model.llama import Llama

GREEDY = GenerateConfig(max_new_tokens=12, temperature=0.0)
PROMPT = [5, 17, 3, 42, 8]


@pytest.fixture(scope="module")
def model(decoder: Llama) -> Llama:
    return decoder


def greedy_by_recompute(model: Llama, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with a full forward pass over the whole sequence at every step, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_generation_with_cache_equals_full_recompute(model: Llama) -> None:
    assert generate(model, PROMPT, GREEDY) == greedy_by_recompute(model, PROMPT, 12)


def test_greedy_equals_transformers_generate(model: Llama) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = model.cfg
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            rms_norm_eps=cfg.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=0,
        )
    ).eval()
    hf.load_state_dict(
        {k if k.startswith("lm_head.") else f"model.{k}": v for k, v in model.state_dict().items()}
    )
    ids = torch.tensor([PROMPT])
    out = hf.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8
    )
    assert generate(model, PROMPT, GenerateConfig(max_new_tokens=8, temperature=0.0)) == (
        out[0, len(PROMPT) :].tolist()
    )


def test_compiled_decode_step_generates_what_the_eager_one_does(model: Llama) -> None:
    """One dynamic-shape compile serves prompts and caches of other lengths, greedy or sampled."""
    fast = GenerateConfig(max_new_tokens=12, temperature=0.0, compile=True)
    assert generate(model, PROMPT, fast) == generate(model, PROMPT, GREEDY)
    longer = [*PROMPT, *PROMPT, 9]
    assert generate(model, longer, fast) == greedy_by_recompute(model, longer, 12)
    sampled = GenerateConfig(max_new_tokens=16, temperature=1.0, top_k=None, top_p=0.9, seed=3)
    compiled = GenerateConfig(**{**sampled.__dict__, "compile": True})
    assert generate(model, PROMPT, compiled) == generate(model, PROMPT, sampled)
    # a left-padded batch (a second graph: the cache has starts), with rows leaving it
    stop = generate(model, PROMPTS[1], GREEDY)[3]
    eager = generate_batch(model, PROMPTS, GREEDY, stop_ids=(stop,))
    assert generate_batch(model, PROMPTS, fast, stop_ids=(stop,)) == eager


def test_zero_new_tokens_generates_nothing(model: Llama) -> None:
    assert generate(model, PROMPT, GenerateConfig(max_new_tokens=0)) == []


def test_top_k_one_equals_greedy(model: Llama) -> None:
    cfg = GenerateConfig(max_new_tokens=12, temperature=1.5, top_k=1, top_p=None)
    assert generate(model, PROMPT, cfg) == generate(model, PROMPT, GREEDY)


def test_stop_token_stops_generation(model: Llama) -> None:
    free = generate(model, PROMPT, GREEDY)
    first = next(i for i, t in enumerate(free) if i >= 2 and free.index(t) == i)
    assert generate(model, PROMPT, GREEDY, stop_ids={free[first]}) == free[: first + 1]


def test_same_seed_same_sample_different_seed_different(model: Llama) -> None:
    cfg = GenerateConfig(max_new_tokens=24, temperature=1.0, top_k=None, top_p=None, seed=1)
    a, b = generate(model, PROMPT, cfg), generate(model, PROMPT, cfg)
    c = generate(model, PROMPT, GenerateConfig(**{**cfg.__dict__, "seed": 2}))
    assert a == b
    assert a != c


def test_top_p_keeps_at_least_the_most_likely_token() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0], [0.0, 0.0, 9.0, 0.0]])
    cfg = GenerateConfig(temperature=1.0, top_k=None, top_p=1e-6)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_next(logits, cfg, g).tolist() == [0, 2]


def test_top_p_samples_only_inside_the_nucleus() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    cfg = GenerateConfig(temperature=1.0, top_k=None, top_p=0.7)
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, cfg, g)) for _ in range(200)}
    assert seen == {0, 1}


def test_a_tiny_temperature_samples_the_argmax_and_bad_seeds_are_refused() -> None:
    """Dividing logits by 1e-40 overflows to inf; sampling must still give the argmax (ties:
    one of the tied), not NaN probabilities. Seeds a generator cannot take fail at once."""
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.5, 0.5, -2.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    for top_k, top_p in [(None, None), (2, None), (None, 0.9)]:
        cfg = GenerateConfig(temperature=1e-40, top_k=top_k, top_p=top_p)
        for _ in range(10):
            first, second = sample_next(logits, cfg, g).tolist()
            assert first == 1 and second in (0, 1)
    for seed in (2**63, -(2**63) - 1):
        with pytest.raises(ValueError, match="generate.seed"):
            GenerateConfig(seed=seed)
    GenerateConfig(seed=2**63 - 1)


def test_generate_restores_training_mode(model: Llama) -> None:
    model.train()
    try:
        generate(model, PROMPT, GenerateConfig(max_new_tokens=2))
        assert model.training
    finally:
        model.eval()


@dataclass
class ToyTokenizer:
    """One token per character: id = ord(c) - 60; bos 0, eos 1."""

    bos_id: int = 0
    eos_id: int = 1

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 60 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i + 60) for i in ids)


def test_generate_text_stops_on_eos_and_drops_it(model: Llama) -> None:
    tok = ToyTokenizer()
    prompt_ids = [tok.bos_id, *tok.encode("ABC")]
    free = generate(model, prompt_ids, GREEDY)
    tok.eos_id = free[2]
    expected = tok.decode(free[: free.index(tok.eos_id)])
    assert generate_text(model, tok, "ABC", GREEDY) == expected


def test_empty_prompt_is_an_error(model: Llama) -> None:
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        generate(model, [], GREEDY)


def test_every_greedy_sample_equals_generate(model: Llama) -> None:
    samples = generate_samples(model, PROMPT, 3, GREEDY)
    assert samples == [generate(model, PROMPT, GREEDY)] * 3


def test_each_sample_follows_its_own_prefix(model: Llama) -> None:
    """Batched rows share one prompt cache, then diverge: every sampled token is among the top 3
    of a full forward pass over that row's own prefix (a row reading another's keys would not
    be), and the rows do diverge."""
    cfg = GenerateConfig(max_new_tokens=10, temperature=1.5, top_k=3, top_p=None, seed=1)
    samples = generate_samples(model, PROMPT, 6, cfg)
    assert len({tuple(s) for s in samples}) > 1
    with torch.no_grad():
        for sample in samples:
            logits = model(torch.tensor([PROMPT + sample]))[0, len(PROMPT) - 1 : -1]
            top3 = logits.topk(3).indices
            assert all(t in top3[i] for i, t in enumerate(sample))


def test_samples_end_at_their_own_stop_token(model: Llama) -> None:
    cfg = GenerateConfig(max_new_tokens=10, temperature=1.5, top_k=3, top_p=None, seed=1)
    free = generate_samples(model, PROMPT, 6, cfg)
    stop = free[0][3]
    stopped = generate_samples(model, PROMPT, 6, cfg, stop_ids=(stop,))
    for full, cut in zip(free, stopped, strict=True):  # same draws until a row stops
        assert cut == (full[: full.index(stop) + 1] if stop in full else full)


def test_generate_texts_drops_eos_and_checks_n(model: Llama) -> None:
    tok = ToyTokenizer()
    free = generate(model, [tok.bos_id, *tok.encode("ABC")], GREEDY)
    tok.eos_id = free[2]
    assert (
        generate_texts(model, tok, "ABC", 2, GREEDY)
        == [generate_text(model, tok, "ABC", GREEDY)] * 2
    )
    assert generate_samples(model, PROMPT, 2, GenerateConfig(max_new_tokens=0)) == [[], []]
    with pytest.raises(ValueError, match="n must be >= 1"):
        generate_samples(model, PROMPT, 0, GREEDY)


PROMPTS = [[5, 17, 3, 42, 8, 9, 11], [7], [30, 2, 2, 61], [5, 17, 3, 42, 8]]
"""Different lengths: every row but the first is left-padded."""


def test_left_padded_rows_compute_what_each_prompt_computes_alone(model: Llama) -> None:
    """Prefill and decode steps of a padded batch: each row's logits equal its prompt run
    alone, so the padding is invisible (masked, and positions start at the row's own first
    token). A NaN from a pad query seeing nothing would reach the real rows here."""
    longest = max(map(len, PROMPTS))
    starts = torch.tensor([longest - len(p) for p in PROMPTS])
    padded = torch.tensor([[0] * (longest - len(p)) + p for p in PROMPTS])
    steps = torch.tensor([[3, 4], [9, 1], [60, 60], [0, 2]])  # two more tokens per row
    with torch.no_grad():
        cache = KVCache(model.cfg, len(PROMPTS), longest + 2, "cpu", torch.float32, starts)
        batch = [model(padded, cache=cache)[:, -1]]
        batch += [model(steps[:, i : i + 1], cache=cache)[:, -1] for i in range(2)]
        for row, prompt in enumerate(PROMPTS):
            alone = model(torch.tensor([prompt + steps[row].tolist()]))[0, len(prompt) - 1 :]
            for i in range(3):
                torch.testing.assert_close(batch[i][row], alone[i], atol=1e-5, rtol=1e-5)


def test_batch_rows_equal_generate_alone_greedy_and_sampled(model: Llama) -> None:
    """Row i is `generate` of prompt i with seed + i, greedy or sampled, with a stop id that
    ends some rows early (they leave the batch; the others' draws do not change)."""
    assert generate_batch(model, PROMPTS, GREEDY) == [generate(model, p, GREEDY) for p in PROMPTS]
    cfg = GenerateConfig(max_new_tokens=10, temperature=1.2, top_k=8, top_p=0.9, seed=4)
    alone = [generate(model, p, replace(cfg, seed=4 + i)) for i, p in enumerate(PROMPTS)]
    assert generate_batch(model, PROMPTS, cfg) == alone
    stop = alone[1][2]
    stopped = generate_batch(model, PROMPTS, cfg, stop_ids=(stop,))
    assert stopped == [
        generate(model, p, replace(cfg, seed=4 + i), {stop}) for i, p in enumerate(PROMPTS)
    ]
    assert len(stopped[1]) == 3


def test_finished_ends_only_its_row(model: Llama) -> None:
    free = generate_batch(model, PROMPTS, GREEDY)
    seen: list[tuple[int, int]] = []

    def finished(row: int, ids: list[int]) -> bool:
        seen.append((row, len(ids)))
        return row == 2 and len(ids) == 4

    cut = generate_batch(model, PROMPTS, GREEDY, finished=finished)
    assert cut == [free[0], free[1], free[2][:4], free[3]]
    assert (2, 5) not in seen and (3, 12) in seen  # row 2 got no token after it finished


def test_generate_batch_edge_cases(model: Llama) -> None:
    assert generate_batch(model, [], GREEDY) == []
    assert generate_batch(model, PROMPTS, GenerateConfig(max_new_tokens=0)) == [[]] * 4
    same = [PROMPT, PROMPT]  # no padding: the cache is left without starts
    assert generate_batch(model, same, GREEDY) == [generate(model, PROMPT, GREEDY)] * 2
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        generate_batch(model, [PROMPT, []], GREEDY)


def test_generate_texts_of_several_prompts_stop_at_stop_texts(model: Llama) -> None:
    tok = ToyTokenizer()
    prompts = ["ABC", "Q", "HELLO"]
    texts = generate_texts(model, tok, prompts, 1, GREEDY)
    assert texts == [generate_text(model, tok, p, GREEDY) for p in prompts]
    stop = texts[0][3:5]  # two characters that end row 0 after its 5th token
    stopped = generate_texts(model, tok, prompts, 1, GREEDY, stop_texts=[stop])
    for full, cut in zip(texts, stopped, strict=True):
        end = full.find(stop)
        assert cut == (full if end < 0 else full[: end + len(stop)])
    with pytest.raises(ValueError, match="need one prompt"):
        generate_texts(model, tok, prompts, 2, GREEDY)
