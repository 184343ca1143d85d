"""lm-eval documents → multiple-choice requests, in lm-evaluation-harness v0.4.x's exact format.

For each task we rebuild what lm_eval builds (its YAML is cited at each formatter): doc_to_text
is the context, doc_to_choice the choices, doc_to_target the gold, " " the target delimiter;
MMLU-style tasks put the subject description and k solved examples first, each "question
answer" followed by "\n\n".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.eval.task_records import LETTERS, Doc, Kind, TaskFormatError

TARGET_DELIMITER = " "
"""lm-eval's default `target_delimiter`: between a context and each choice."""
FEWSHOT_DELIMITER = "\n\n"
"""lm-eval's default `fewshot_delimiter`: after each few-shot example's answer."""


@dataclass(frozen=True, kw_only=True)
class Request:
    """One multiple-choice question as (context, continuation) pairs, one pair per choice."""

    contexts: tuple[str, ...]
    """Prompt per choice, few-shot prefix included: one string repeated, except for winogrande
    whose choices differ in the context (lm-eval's "multiple input" tasks)."""
    continuations: tuple[str, ...]
    """Text scored per choice, target delimiter included (" Paris")."""
    gold: int
    """Index of the correct choice."""
    choice_texts: tuple[str, ...]
    """lm-eval's `doc_to_choice(doc)`; acc_norm divides each choice's log-likelihood by the
    `len()` of these strings (characters, without the target delimiter): lm_eval/api/task.py
    `ConfigurableTask.process_results`, `completion_len = np.array([float(len(i)) for i in
    choices])` with `choices = self.doc_to_choice(doc)`. For winogrande they are the per-choice
    partial sentences, not the shared continuation."""
    where: str = field(default="", compare=False)
    """The record it came from ("file:line", or "hf_path[config]:split:i" for a hub dataset),
    for error messages and results."""


@dataclass(frozen=True, kw_only=True)
class _Item:
    """One doc as lm-eval's doc_to_text / doc_to_choice / doc_to_target see it."""

    prompts: tuple[str, ...]
    """doc_to_text per choice (the same for all, except winogrande)."""
    answers: tuple[str, ...]
    """Text after the target delimiter per choice."""
    gold: int
    choice_texts: tuple[str, ...]


def _same_prompt(prompt: str, choices: list[str], gold: int) -> _Item:
    texts = tuple(str(c) for c in choices)
    return _Item(prompts=(prompt,) * len(texts), answers=texts, gold=gold, choice_texts=texts)


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


def _format(kind: Kind, d: Doc, where: str) -> _Item:
    """lm-eval's doc_to_text / doc_to_choice / doc_to_target for one doc."""
    try:
        item = _format_unchecked(kind, d)
    except (KeyError, ValueError, IndexError, AttributeError) as e:
        raise TaskFormatError(f"{where}: cannot build the {kind} prompt: {e!r}") from e
    if not 0 <= item.gold < len(item.answers):
        raise TaskFormatError(f"{where}: gold {item.gold} outside {len(item.answers)} choices")
    return item


def _format_unchecked(kind: Kind, d: Doc) -> _Item:
    match kind:
        case "arc":  # lm_eval/tasks/arc/arc_easy.yaml
            gold = d["choices"]["label"].index(d["answerKey"])
            return _same_prompt(f"Question: {d['question']}\nAnswer:", d["choices"]["text"], gold)
        case "openbookqa":  # lm_eval/tasks/openbookqa/openbookqa.yaml
            gold = d["choices"]["label"].index(d["answerKey"].lstrip())
            return _same_prompt(d["question_stem"], d["choices"]["text"], gold)
        case "boolq":  # lm_eval/tasks/super_glue/boolq/default.yaml
            prompt = f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:"
            return _same_prompt(prompt, ["no", "yes"], int(d["label"]))
        case "copa":  # lm_eval/tasks/super_glue/copa/utils.py: drop the premise's period
            connector = {"cause": "because", "effect": "therefore"}[d["question"]]
            prompt = d["premise"].strip()[:-1] + f" {connector}"
            choices = [" " + _lower_first(d["choice1"]), " " + _lower_first(d["choice2"])]
            return _same_prompt(prompt, choices, int(d["label"]))
        case "hellaswag":  # lm_eval/tasks/hellaswag/hellaswag.yaml (target is `label`)
            return _same_prompt(d["query"], d["choices"], int(d["label"]))
        case "piqa":  # lm_eval/tasks/piqa/piqa.yaml
            prompt = f"Question: {d['goal']}\nAnswer:"
            return _same_prompt(prompt, [d["sol1"], d["sol2"]], int(d["label"]))
        case "sciq":  # lm_eval/tasks/sciq/sciq.yaml: the correct answer is always last
            prompt = f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:"
            choices = [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]]
            return _same_prompt(prompt, choices, 3)
        case "winogrande":  # lm_eval/tasks/winogrande/preprocess_winogrande.py
            # Partial evaluation: each option fills the blank in its own context and the rest
            # of the sentence is the one continuation scored.
            blank = d["sentence"].index("_")
            prompts = tuple(d["sentence"][:blank] + d[k] for k in ("option1", "option2"))
            rest = d["sentence"][blank + 1 :].strip()
            gold = {"1": 0, "2": 1}[d["answer"]]
            return _Item(prompts=prompts, answers=(rest, rest), gold=gold, choice_texts=prompts)
        case "mmlu":  # lm_eval/tasks/mmlu/default/_default_template_yaml
            options = "".join(f"\n{x}. {c}" for x, c in zip(LETTERS, d["choices"], strict=True))
            prompt = f"{d['question'].strip()}{options}\nAnswer:"
            return _same_prompt(prompt, list(LETTERS), int(d["answer"]))
        case "cmmlu":  # lm_eval/tasks/cmmlu/_default_template_yaml
            options = "".join(f"\n{x}. {d[x]}" for x in LETTERS)
            gold = LETTERS.index(d["Answer"])
            return _same_prompt(f"{d['Question'].strip()}{options}\n答案：", list(LETTERS), gold)
        case "ceval":  # lm_eval/tasks/ceval/_default_ceval_yaml
            options = "".join(f"\n{x}. {d[x]}" for x in LETTERS)
            gold = LETTERS.index(d["answer"])
            return _same_prompt(f"{d['question'].strip()}{options}\n答案：", list(LETTERS), gold)


def _shot_text(item: _Item) -> str:
    """One solved example (lm_eval/api/task.py `build_qa_turn`): question, delimiter, gold."""
    return item.prompts[item.gold] + TARGET_DELIMITER + item.answers[item.gold] + FEWSHOT_DELIMITER


def build_request(kind: Kind, doc: Doc, where: str, shots: list[Doc], description: str) -> Request:
    item = _format(kind, doc, where)
    prefix = description + "".join(_shot_text(_format(kind, s, f"{where} (shot)")) for s in shots)
    return Request(
        contexts=tuple(prefix + p for p in item.prompts),
        continuations=tuple(TARGET_DELIMITER + a for a in item.answers),
        gold=item.gold,
        choice_texts=item.choice_texts,
        where=where,
    )
