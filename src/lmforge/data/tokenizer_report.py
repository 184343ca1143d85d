"""Compare how well tokenizers compress each source (language): a table, Markdown and a bar chart.

Bytes per token is the language-neutral number; tokens per 1,000 Han characters (Chinese) and per
1,000 English words are the ones the technical reports quote when they compare vocabularies.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

Encoder = Callable[[str], list[int]]
"""Text → token ids, with no BOS/EOS or other special tokens added."""

HAN = re.compile(
    "[\u3005\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f\U00030000-\U0003347f]"
)
"""Han characters: CJK Unified Ideographs (+ Extensions A–H), Compatibility Ideographs, 々, 〇."""

WORD = re.compile(r"[A-Za-z]+")
"""An English word, for tokens per 1,000 words: a maximal run of ASCII letters."""

REPORT_FILES = ("tokenizer_report.json", "tokenizer_report.md", "tokenizer_report.png")


def load_reference(path: str | Path) -> tuple[str, Encoder]:
    """A name and an encode function for a HF `tokenizer.json` or a sentencepiece `.model` file.

    The name is the file's stem, or its folder's name for the usual `tokenizer.json` /
    `tokenizer.model`. Encoding adds no special tokens (no BOS/EOS).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: reference tokenizer not found")
    name = path.parent.name if path.stem == "tokenizer" and path.parent.name else path.stem
    if path.suffix == ".json":
        from tokenizers import Tokenizer

        try:
            hf = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        return name, lambda text: hf.encode(text, add_special_tokens=False).ids
    if path.suffix == ".model":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a valid sentencepiece model ({e})") from None
        return name, lambda text: list(sp.EncodeAsIds(text))
    raise ValueError(
        f"{path}: unsupported tokenizer file; expected a HF tokenizer.json or sentencepiece .model"
    )


def compression_table(
    encoders: dict[str, Encoder], texts_by_source: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """One row per (tokenizer, source), tokenizers in the outer loop, both in the given order.

    Counts are summed over the source's documents, each encoded on its own:
    - `tokens`: token ids; `bytes`: UTF-8 bytes; `chars`: Unicode code points.
    - `bytes_per_token` = bytes / tokens, `chars_per_token` = chars / tokens (None if no tokens).
    - `language`: "zh" when Han characters (`HAN`) are a strict majority of the letters
      (`str.isalpha`, which counts Han as letters), else "other".
    - `tokens_per_1k_han` = tokens × 1000 / Han characters, for "zh" sources only, else None.
    - `tokens_per_1k_words` = tokens × 1000 / English words (`WORD`, runs of `[A-Za-z]`), for
      "other" sources with at least one word, else None.
    Tokens in both ratios include everything in the source (punctuation, digits, spaces).
    """
    stats = {name: _source_stats(name, texts) for name, texts in texts_by_source.items()}
    rows = []
    for tok_name, encode in encoders.items():
        for source, texts in texts_by_source.items():
            s = stats[source]
            tokens = sum(len(encode(text)) for text in texts)
            zh = s["language"] == "zh"
            rows.append(
                {
                    "tokenizer": tok_name,
                    "source": source,
                    "language": s["language"],
                    "docs": len(texts),
                    "tokens": tokens,
                    "bytes": s["bytes"],
                    "chars": s["chars"],
                    "bytes_per_token": s["bytes"] / tokens if tokens else None,
                    "chars_per_token": s["chars"] / tokens if tokens else None,
                    "tokens_per_1k_han": tokens * 1000 / s["han"] if zh else None,
                    "tokens_per_1k_words": (
                        tokens * 1000 / s["words"] if not zh and s["words"] else None
                    ),
                }
            )
    return rows


def _source_stats(name: str, texts: list[str]) -> dict[str, Any]:
    text = "".join(texts)
    if not text:
        raise ValueError(f"texts_by_source: source {name!r} has no text")
    han = len(HAN.findall(text))
    letters = sum(1 for ch in text if ch.isalpha())
    return {
        "bytes": sum(len(t.encode("utf-8")) for t in texts),
        "chars": len(text),
        "han": han,
        "words": sum(len(WORD.findall(t)) for t in texts),  # not across document joins
        "language": "zh" if han * 2 > letters else "other",
    }


_COLUMNS = (
    ("tokenizer", "tokenizer"),
    ("source", "source"),
    ("language", "lang"),
    ("tokens", "tokens"),
    ("bytes", "bytes"),
    ("bytes_per_token", "bytes/token"),
    ("chars_per_token", "chars/token"),
    ("tokens_per_1k_han", "tokens/1k Han"),
    ("tokens_per_1k_words", "tokens/1k words"),
)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub Markdown table of `compression_table` rows; ratios to 2 decimals, None as "–"."""
    lines = [
        "| " + " | ".join(title for _, title in _COLUMNS) + " |",
        "|"
        + "|".join(
            "---" if key in ("tokenizer", "source", "language") else "---:" for key, _ in _COLUMNS
        )
        + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[key]) for key, _ in _COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def plot_bytes_per_token(rows: list[dict[str, Any]], out_png: Path) -> None:
    """Grouped bars of bytes/token: sources on x, one bar per tokenizer; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sources = list(dict.fromkeys(row["source"] for row in rows))
    tokenizers = list(dict.fromkeys(row["tokenizer"] for row in rows))
    value = {(r["tokenizer"], r["source"]): r["bytes_per_token"] or 0.0 for r in rows}
    fig = Figure(figsize=(max(6.0, 1.0 + len(sources) * (0.5 + 0.4 * len(tokenizers))), 4.5))
    FigureCanvasAgg(fig)  # no pyplot: no global backend state, safe in any process
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(tokenizers))
    for i, tok in enumerate(tokenizers):
        xs = [j + (i - (len(tokenizers) - 1) / 2) * width for j in range(len(sources))]
        bars = ax.bar(xs, [value.get((tok, s), 0.0) for s in sources], width, label=tok)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(sources)), sources)
    ax.set_xlabel("source")
    ax.set_ylabel("UTF-8 bytes per token (higher = better compression)")
    ax.set_title("Tokenizer compression by source")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    _write_atomically(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def write_report(
    encoders: dict[str, Encoder], texts_by_source: dict[str, list[str]], out_dir: Path
) -> dict[str, Any]:
    """Write tokenizer_report.{json,md,png} into `out_dir`; return the rows and the file paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = compression_table(encoders, texts_by_source)
    json_path, md_path, png_path = (out_dir / name for name in REPORT_FILES)
    text = json.dumps({"rows": rows}, indent=2, ensure_ascii=False) + "\n"
    _write_atomically(json_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    md = "# Tokenizer compression\n\n" + markdown_table(rows)
    _write_atomically(md_path, lambda tmp: tmp.write_text(md, encoding="utf-8"))
    plot_bytes_per_token(rows, png_path)
    return {"rows": rows, "files": [str(p) for p in (json_path, md_path, png_path)]}


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write` on a temp file next to `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
