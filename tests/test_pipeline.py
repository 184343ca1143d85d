"""The pipeline's view of the val split: cut by source in manifest order."""

from __future__ import annotations

from pathlib import Path

from lmforge.data.loader import DocumentSet
from lmforge.data.shards import list_shards
from lmforge.data.tokenizer import TextTokenizer
from lmforge.pipeline import val_parts_by_source


def test_val_parts_hold_each_sources_documents(prepared_run: Path) -> None:
    tokenizer = TextTokenizer.load(prepared_run / "tokenizer.json")
    val = DocumentSet(list_shards(prepared_run / "shards", "val"))
    parts = dict(val_parts_by_source(val, prepared_run / "shards" / "manifest.json"))
    assert sum(p.num_docs for p in parts.values()) == val.num_docs
    assert sum(p.num_tokens for p in parts.values()) == val.num_tokens

    def text(name: str) -> str:
        part = parts[name]
        return "".join(tokenizer.decode(part.document(i).tolist()) for i in range(part.num_docs))

    assert "chinese" in parts and sum("\u4e00" <= c <= "\u9fff" for c in text("chinese")) > 50
    for name in set(parts) - {"chinese"}:
        assert not any("\u4e00" <= c <= "\u9fff" for c in text(name)), name
