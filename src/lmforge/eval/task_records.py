"""Benchmark files → documents in the fields of the Hugging Face dataset lm-eval loads.

Local copies of a benchmark come in several layouts (the HF dataset's own JSONL, llm-foundry's
ICL reformatting, the original CSV or text releases); each record's layout is detected from its
fields and converted, so the prompt formatters see one layout per task. Errors name the
file and line.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from lmforge.jsonl import json_lines

Doc = dict[str, Any]
Kind = Literal[
    "arc", "boolq", "copa", "hellaswag", "openbookqa", "piqa", "sciq", "winogrande", "mmlu",
    "cmmlu", "ceval",
]  # fmt: skip

LETTERS = ("A", "B", "C", "D")


class TaskFormatError(ValueError):
    """A data file or record that does not map onto the fields lm-eval's task needs."""


# ---------------------------------------------------------------- reading records from files


def _read_jsonl(path: Path) -> Iterator[tuple[str, Doc]]:
    """JSON lines, split at newlines only (U+2028 may stand raw inside a JSON string), or a
    .json array of records."""
    data = path.read_bytes()
    if path.suffix == ".json" and data.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"["):
        try:
            records = json.loads(data)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
            raise TaskFormatError(f"{path}: not a valid JSON array ({e})") from None
        yield from ((f"{path}:[{i}]", r) for i, r in enumerate(records))
        return
    for i, record in json_lines(data.split(b"\n"), path, TaskFormatError):
        yield f"{path}:{i}", record


def _read_csv(path: Path) -> Iterator[tuple[str, Doc]]:
    """CSV rows keyed by header; a file with no question header (the original Hendrycks MMLU
    release: question, four choices, letter) is keyed by column number instead."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        rows = [(reader.line_num, row) for row in reader]
    if not rows:
        return
    header = rows[0][1]
    if {"question", "Question"} & set(header):
        rows = rows[1:]
    else:
        header = [str(i) for i in range(len(header))]
    for line, row in rows:
        if len(row) != len(header):
            raise TaskFormatError(f"{path}:{line}: {len(row)} columns, header has {len(header)}")
        yield f"{path}:{line}", dict(zip(header, row, strict=True))


def _read_hellaswag_txt(path: Path) -> Iterator[tuple[str, Doc]]:
    """klosax/hellaswag_text_data layout: context, gold label, four endings; 6 lines a task."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise TaskFormatError(f"{path}: {len(lines)} lines, not 6 per task (context, label, 4)")
    for start in range(0, len(lines), 6):
        yield (
            f"{path}:{start + 1}",
            {
                "text_context": lines[start],
                "text_label": lines[start + 1],
                "text_endings": lines[start + 2 : start + 6],
            },
        )


def read_records(path: Path) -> Iterator[tuple[str, Doc]]:
    match path.suffix:
        case ".jsonl" | ".json":
            records = _read_jsonl(path)
        case ".csv":
            records = _read_csv(path)
        case ".txt":
            records = _read_hellaswag_txt(path)
        case _:
            raise TaskFormatError(f"{path}: unknown file type (expected .jsonl, .json, .csv, .txt)")
    for where, record in records:
        if not isinstance(record, dict):
            raise TaskFormatError(f"{where}: expected an object, got {type(record).__name__}")
        yield where, record


# ---------------------------------------------------------------- record formats → lm-eval docs


def _pick(record: Doc, keys: Iterable[str]) -> Doc:
    return {k: record[k] for k in keys}


def _letter_index(letter: Any, where: str, key: str, letters: Iterable[str] = LETTERS) -> int:
    letters = list(letters)
    if letter not in letters:
        raise TaskFormatError(f"{where}: {key}={letter!r} is not one of {letters}")
    return letters.index(letter)


def _int_field(record: Doc, key: str, where: str) -> int:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise TaskFormatError(f"{where}: {key}={value!r} is not a non-negative integer")
    return int(value)


def _from_icl(record: Doc, where: str, question_key: str, prefix: str) -> Doc:
    """llm-foundry ICL record {"query", "choices", "gold"} → ai2_arc / openbookqa fields.

    Its query is lm-eval's question with `prefix` in front and without "\nAnswer:", so the
    question is recovered exactly; choice labels are lost and rebuilt as A, B, C, ...
    """
    query = record["query"]
    if not query.startswith(prefix):
        raise TaskFormatError(f"{where}: query does not start with {prefix!r}: {query[:60]!r}")
    labels = [chr(ord("A") + i) for i in range(len(record["choices"]))]
    gold = _int_field(record, "gold", where)
    if gold >= len(labels):
        raise TaskFormatError(f"{where}: gold={gold} with {len(labels)} choices")
    return {
        question_key: query[len(prefix) :],
        "choices": {"text": list(record["choices"]), "label": labels},
        "answerKey": labels[gold],
    }


def _boolq_from_google(record: Doc, where: str) -> Doc:
    """HF `google/boolq` {"question", "passage", "answer": bool} → super_glue's `label` 0/1.

    Parity gap: super_glue passages (what lm-eval reads) start with the Wikipedia title,
    "Ethanol fuel -- All biomass goes ..."; google/boolq dropped the title, so these contexts
    lack the "<title> -- " prefix and cannot equal lm-eval's.
    """
    if not isinstance(record["answer"], bool):
        raise TaskFormatError(f"{where}: answer={record['answer']!r} is not true/false")
    return {
        "question": record["question"],
        "passage": record["passage"],
        "label": int(record["answer"]),
    }


def _hellaswag_clean(text: str) -> str:
    """lm_eval/tasks/hellaswag/utils.py `preprocess`: WikiHow markup out, " [title]" → ". "."""
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ")


def _hellaswag_from_hf(record: Doc, where: str) -> Doc:
    """Rowan/hellaswag fields → lm-eval's processed doc (hellaswag/utils.py `process_docs`)."""
    context = f"{record['activity_label']}: {record['ctx_a']} {record['ctx_b'].capitalize()}"
    return {
        "query": _hellaswag_clean(context),
        "choices": [_hellaswag_clean(e) for e in record["endings"]],
        "gold": _int_field(record, "label", where),
        "label": str(record["label"]),
    }


_SENTENCE_END = re.compile(r"[.!?] ")


def _hellaswag_from_text(record: Doc, where: str) -> Doc:
    """klosax/hellaswag_text_data line → lm-eval's processed doc, as nearly as the text allows.

    That file joined the raw `ctx` (= ctx_a + " " + ctx_b) where lm-eval joins ctx_a with
    `ctx_b.capitalize()`. ActivityNet ctx_b is the lowercase start of the last, unfinished
    sentence, so a last sentence that starts lowercase and has no end mark is capitalized: 2281
    records of the shared file, every ActivityNet-style one except 4 whose last sentence starts
    with a digit or a quote, which capitalize() leaves alone. Remaining gap: a WikiHow ending
    that began with a marker ("[step] Take ...") keeps a leading space in lm-eval ("  Take ..."
    after the delimiter) but not in this file, which stripped it; the text cannot tell which.
    """
    label = record["text_label"]
    if label not in {"0", "1", "2", "3"}:
        raise TaskFormatError(f"{where}: line 2 of the task is {label!r}, not a label 0-3")
    head, sep, context = record["text_context"].partition(": ")
    cut = max((m.end() for m in _SENTENCE_END.finditer(context)), default=0)
    tail = context[cut:]
    if tail[:1].islower() and tail[-1:] not in ".!?":
        context = context[:cut] + tail.capitalize()
    return {
        "query": _hellaswag_clean(head + sep + context),
        "choices": [_hellaswag_clean(e) for e in record["text_endings"]],
        "gold": int(label),
        "label": label,
    }


def _mmlu_from_csv(record: Doc, where: str) -> Doc:
    """Shared-data CSV (question, choice0-3, 0-based answer) → cais/mmlu fields."""
    choices = [record[f"choice{i}"] for i in range(4)]
    answer = _int_field(record, "answer", where)
    return {"question": record["question"], "choices": choices, "answer": answer}


def _mmlu_from_hendrycks(record: Doc, where: str) -> Doc:
    """Original headerless CSV (question, A, B, C, D, letter) → cais/mmlu fields."""
    answer = _letter_index(record["5"], where, "column 6")
    choices = [record[str(i)] for i in range(1, 5)]
    return {"question": record["0"], "choices": choices, "answer": answer}


_CMMLU_KEYS = ("Question", "A", "B", "C", "D", "Answer")
_CEVAL_KEYS = ("question", "A", "B", "C", "D", "answer")
_Converter = Callable[[Doc, str], Doc] | None


def _keys(names: str) -> frozenset[str]:
    return frozenset(names.split())


_FORMATS: dict[Kind, list[tuple[frozenset[str], _Converter]]] = {
    # Per kind: (required fields, converter or None to keep the record); the first entry is the
    # layout of the dataset lm-eval loads.
    "arc": [
        (_keys("question choices answerKey"), None),
        (_keys("query choices gold"), lambda r, w: _from_icl(r, w, "question", "Question: ")),
    ],
    "openbookqa": [
        (_keys("question_stem choices answerKey"), None),
        (_keys("query choices gold"), lambda r, w: _from_icl(r, w, "question_stem", "")),
    ],
    "boolq": [
        (_keys("question passage label"), None),
        (_keys("question passage answer"), _boolq_from_google),
    ],
    "copa": [(_keys("premise choice1 choice2 question label"), None)],
    "hellaswag": [
        (_keys("activity_label ctx_a ctx_b endings label"), _hellaswag_from_hf),
        (_keys("query choices gold label"), None),
        (_keys("text_context text_label text_endings"), _hellaswag_from_text),
    ],
    "piqa": [(_keys("goal sol1 sol2 label"), None)],
    "sciq": [(_keys("question distractor1 distractor2 distractor3 correct_answer support"), None)],
    "winogrande": [(_keys("sentence option1 option2 answer"), None)],
    "mmlu": [
        (_keys("question choices answer"), None),
        (_keys("question choice0 choice1 choice2 choice3 answer"), _mmlu_from_csv),
        (_keys("0 1 2 3 4 5"), _mmlu_from_hendrycks),
    ],
    "cmmlu": [(frozenset(_CMMLU_KEYS), lambda r, w: _pick(r, _CMMLU_KEYS))],
    "ceval": [(frozenset(_CEVAL_KEYS), lambda r, w: _pick(r, _CEVAL_KEYS))],
}


def _format_of(kind: Kind, record: Doc) -> int | None:
    """Index into _FORMATS[kind] of the record's layout (0 = lm-eval's own), None if unknown."""
    for i, (keys, _) in enumerate(_FORMATS[kind]):
        if keys <= record.keys():
            return i
    return None


def in_lm_eval_layout(kind: Kind, record: Doc) -> bool:
    """Whether the record already has the fields of the dataset lm-eval loads for `kind`."""
    return _format_of(kind, record) == 0


def _to_doc(kind: Kind, record: Doc, where: str) -> Doc:
    index = _format_of(kind, record)
    if index is None:
        known = " or ".join(str(sorted(keys)) for keys, _ in _FORMATS[kind])
        raise TaskFormatError(f"{where}: fields {sorted(record)} match no {kind} format ({known})")
    convert = _FORMATS[kind][index][1]
    return record if convert is None else convert(record, where)


def convert_records(kind: Kind, records: Iterable[tuple[str, Doc]]) -> tuple[list[Doc], list[str]]:
    docs, sources = [], []
    for where, record in records:
        docs.append(_to_doc(kind, record, where))
        sources.append(where)
    return docs, sources
