"""lm-evaluation-harness adapter: any lm-eval task on an lmforge checkpoint, without conversion.

    python -m lmforge.eval.harness --model lmforge \\
        --model_args checkpoint=runs/demo/checkpoints/step_00000586 --tasks arc_easy,piqa

lm-eval finds models only among the names registered in the running process (it has no plugin
entry point), so this module registers `lmforge` and then hands its arguments to lm-eval's own
command line. `import lmforge.eval.harness` does the same for the Python API
(`lm_eval.simple_evaluate(model="lmforge", model_args=...)`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from lmforge.data.tokenizer import TextTokenizer
from lmforge.eval.multiple_choice import LoglikelihoodScorer, Tree
from lmforge.generate import GenerateConfig, decode_new, generate_batch, stop_text_check

_DTYPES = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class _Group:
    """Requests sharing one context, scored together (one prefix forward)."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int = 0
    choice_texts: tuple[str, ...] = ()


@register_model("lmforge")
class LmforgeLM(LM):
    """An lmforge checkpoint behind lm-eval's three request types."""

    def __init__(
        self,
        checkpoint: str,
        tokenizer: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        max_length: int | None = None,
        batch_size: int | str = 1,  # rows per generate_until batch; scoring batches by context
        **_: Any,
    ) -> None:
        super().__init__()
        from lmforge.pipeline import load_trained  # the pipeline imports torch models lazily

        path = Path(checkpoint)
        self.model, recipe = load_trained(path)
        self.model.to(device)
        tokenizer_path = Path(tokenizer) if tokenizer else path.parent.parent / "tokenizer.json"
        self.tokenizer = TextTokenizer.load(tokenizer_path)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: one of {sorted(_DTYPES)}, got {dtype!r}")
        self.max_length = int(max_length or recipe.packing.seq_len)
        self.scorer = LoglikelihoodScorer(
            self.model,
            self.tokenizer.encode,
            self.tokenizer.bos_id,
            self.max_length,
            torch.device(device),
            _DTYPES[dtype],
            encode_batch=self.tokenizer.encode_batch,
        )
        self.generate_cfg = replace(recipe.generate, temperature=0.0)
        self.generate_batch_size = _batch_size(batch_size)

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list:
        """Requests grouped by context (each context runs once), all groups batched together."""
        by_context: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            by_context.setdefault(r.args[0], []).append(i)
        groups = [
            _Group((context,) * len(members), tuple(requests[i].args[1] for i in members))
            for context, members in by_context.items()
        ]
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        scores = self.scorer.score(groups, desc="lmforge")
        for members, group_scores in zip(by_context.values(), scores, strict=True):
            for i, s in zip(members, group_scores, strict=True):
                out[i] = (s.logprob, s.greedy)
        return out

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list:
        """Whole-document log-likelihood in max_length windows, as lm-eval's HF model does;
        the windows of all documents are scored in shared batches."""
        trees, owner = [], []
        for n, r in enumerate(requests):
            windows = get_rolling_token_windows(
                token_list=self.tokenizer.encode(r.args[0]),
                prefix_token=self.tokenizer.bos_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, pred in map(make_disjoint_window, windows):
                trees.append(Tree(list(context), [list(pred)]))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, scores in zip(owner, self.scorer.score_trees(trees, "lmforge rolling"), strict=True):
            totals[n] += scores[0].logprob
        return totals

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list:
        """Greedy (or sampled, with do_sample) continuations cut at the first `until` string.
        Requests with the same generation settings decode batch_size at a time, longest
        contexts first (similar lengths share a batch: less left padding); a row stops as soon
        as its text holds an `until` string or EOS."""
        groups: dict[tuple[int, float, tuple[str, ...]], list[int]] = {}
        for i, r in enumerate(requests):
            kwargs = r.args[1]
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(s for s in until if s)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0
            groups.setdefault(
                (int(kwargs.get("max_gen_toks", 256)), temperature, until), []
            ).append(i)
        outputs: list[str] = [""] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="lmforge generate") as bar:
            for (max_new, temperature, until), members in groups.items():
                cfg = replace(self.generate_cfg, max_new_tokens=max_new, temperature=temperature)
                members.sort(key=lambda i: -len(requests[i].args[0]))
                for at in range(0, len(members), self.generate_batch_size):
                    batch = members[at : at + self.generate_batch_size]
                    texts = self._generate([requests[i].args[0] for i in batch], cfg, until)
                    for i, text in zip(batch, texts, strict=True):
                        cut = min((text.find(s) for s in until if s in text), default=len(text))
                        outputs[i] = text[:cut]
                    bar.update(len(batch))
        return outputs

    def _generate(
        self, contexts: list[str], cfg: GenerateConfig, until: tuple[str, ...]
    ) -> list[str]:
        """Continuations of BOS + each context, its tokens cut from the left to leave room for
        cfg.max_new_tokens in max_length (as lm-eval's HF model cuts them)."""
        room = self.max_length - cfg.max_new_tokens
        if room < 1:
            raise ValueError(
                f"generate_until: max_gen_toks {cfg.max_new_tokens} leaves no room for a context "
                f"in max_length {self.max_length}"
            )
        tok = self.tokenizer
        prompts = [[tok.bos_id, *ids][-room:] for ids in tok.encode_batch(contexts)]
        finished = stop_text_check(tok, until) if until else None
        new = generate_batch(self.model, prompts, cfg, (tok.eos_id,), finished)
        return [decode_new(tok, s) for s in new]

    @property
    def tokenizer_name(self) -> str:
        return "lmforge"


def _batch_size(value: int | str) -> int:
    """lm-eval's --batch_size: a number, or "auto"/"auto:N", taken here as 16 rows, the largest
    batch measured (7x the tokens/s of one at a time on a 2-core CPU: benchmarks/RESULTS.md)."""
    if str(value).startswith("auto"):
        return 16
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"batch_size: a positive integer or 'auto', got {value!r}") from None
    if size < 1:
        raise ValueError(f"batch_size: a positive integer or 'auto', got {value!r}")
    return size


def main(argv: Sequence[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
