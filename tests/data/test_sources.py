"""Reading raw documents: formats, path kinds, byte caps, and errors that name path:line."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmforge.data.corpus import iter_builtin
from lmforge.data.sources import DataError, SourceConfig, read_documents


def _write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def _read(path: Path | str, text_field: str = "text", max_bytes: int | None = None) -> list[str]:
    source = SourceConfig(name="t", path=str(path), text_field=text_field, max_bytes=max_bytes)
    return list(read_documents(source))


def test_jsonl_yields_text_field_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"body": "one"}\n\n   \n{"body": "two\\nlines"}\r\n{"body": ""}\n')
    assert _read(path, text_field="body") == ["one", "two\nlines"]


def test_jsonl_gz_and_txt_and_directory_are_read_in_sorted_order(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "gz doc 中文"}) + "\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("whole file\n  is one doc\n")
    _write_jsonl(tmp_path / "a.jsonl", ["a1", "a2"])
    (tmp_path / "ignored.csv").write_text("x,y\n")
    assert _read(tmp_path) == ["a1", "a2", "gz doc 中文", "whole file\n  is one doc\n"]
    assert _read(tmp_path / "*.jsonl*") == ["a1", "a2", "gz doc 中文"]


def test_max_bytes_stops_early(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "a.jsonl", ["x" * 100] * 10)
    assert len(_read(path, max_bytes=250)) == 3


def test_malformed_json_names_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "oops"\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: malformed JSON")):
        _read(path)


def test_invalid_utf8_names_path_line_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(
        DataError, match=re.escape(f"{path}:2: invalid UTF-8 byte 0xe9 at byte offset 28")
    ):
        _read(path)


def test_invalid_utf8_in_txt_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"line one\nline two \xff\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: invalid UTF-8")):
        _read(path)


def test_missing_text_field_names_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no text key"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:2: missing text field 'text'")):
        _read(path)


def test_non_string_text_field_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": 3}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:1: text field 'text' must be a string")):
        _read(path)


@pytest.mark.parametrize("content", ["", "\n\n", '{"text": ""}\n'])
def test_empty_file_has_no_documents(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(f"{path}: no documents")):
        _read(path)


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        _read(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no files match"):
        _read(tmp_path / "nope*.jsonl")


def test_hf_source_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets → ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        _read("hf:some/dataset:train")


def test_hf_source_reads_local_files_through_load_dataset(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "a.jsonl", ["first", "second 中文"])
    assert _read(f"hf:{tmp_path / 'a.jsonl'}") == ["first", "second 中文"]
    assert _read(f"hf:{tmp_path / 'a.jsonl'}:train") == ["first", "second 中文"]
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"b.jsonl:2: text field 'text' is null or missing"):
        _read(f"hf:{tmp_path / 'b.jsonl'}")


def test_hf_source_that_cannot_parse_a_line_is_a_named_error(tmp_path: Path) -> None:
    """datasets' own parse error (pyarrow's) names the source and the rows read before it; in
    skip mode it is handed over (pyarrow parsed the file as one block: no rows are left)."""
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": \n')
    with pytest.raises(DataError, match=r"hf:.*c.jsonl: unreadable after row 0 \(ArrowInvalid"):
        _read(f"hf:{tmp_path / 'c.jsonl'}")
    errors: list[DataError] = []
    source = SourceConfig(name="t", path=f"hf:{tmp_path / 'c.jsonl'}")
    with pytest.raises(DataError, match="no documents"):
        list(read_documents(source, on_error=errors.append))
    assert len(errors) == 1 and "unreadable after row 0" in str(errors[0])


def test_paths_are_read_as_given(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file whose name holds glob characters is that file, not a pattern; a directory names
    the files it does not read; a .txt loses its BOM as a .jsonl does; a null text is called
    null, not missing."""
    _write_jsonl(tmp_path / "corpus[1].jsonl", ["the right file"])
    _write_jsonl(tmp_path / "corpus1.jsonl", ["the wrong file"])
    assert _read(tmp_path / "corpus[1].jsonl") == ["the right file"]
    assert _read(tmp_path / "corpus[1-9].jsonl") == ["the wrong file"]  # a pattern still is
    data = tmp_path / "dir"
    data.mkdir()
    _write_jsonl(data / "a.jsonl", ["read"])
    (data / "b.json").write_text('[{"text": "not read"}]')
    (data / "c.ndjson").write_text('{"text": "not read"}\n')
    (data / ".hidden.json").write_text("{}")
    with caplog.at_level("WARNING", logger="lmforge.data.sources"):
        assert _read(data) == ["read"]
    assert "not reading 2 file(s) of other types (b.json, c.ndjson)" in caplog.text
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHello")
    assert _read(tmp_path / "bom.txt") == ["Hello"]
    (tmp_path / "null.jsonl").write_text('{"text": null}\n')
    with pytest.raises(DataError, match=r"null.jsonl:1: text field 'text' is null or missing"):
        _read(tmp_path / "null.jsonl")


def test_zstd_and_parquet_files(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    lines = "".join(json.dumps({"text": t}) + "\n" for t in ["z1", "z2 中文"]).encode()
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": ["p1", "p2"], "id": [1, 2]}), tmp_path / "b.parquet")
    assert _read(tmp_path) == ["z1", "z2 中文", "p1", "p2"]
    with pytest.raises(DataError, match=r"b.parquet: missing text column 'body'"):
        _read(tmp_path / "b.parquet", text_field="body")
    (tmp_path / "c.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(DataError, match=r"c.jsonl.zst: corrupt zstd file"):
        _read(tmp_path / "c.jsonl.zst")


def test_enormous_document_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "a.jsonl", ["small", "x" * 5000, "small again"])
    source = SourceConfig(name="t", path=str(path), max_document_bytes=1000)
    with pytest.raises(DataError, match=re.escape(f"{path}:2: document of 5,0")):
        list(read_documents(source))


def test_on_error_skip_hands_over_each_bad_item_and_keeps_the_good_ones(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(
        b'{"text": "good 1"}\n{"text": "broken\n{"text": "caf\xe9"}\n'
        b'{"other": 1}\n["not an object"]\n{"text": "good 2"}\n'
    )
    (tmp_path / "b.txt").write_bytes(b"bad \xff utf-8 in a whole-file document")
    (tmp_path / "c.jsonl").write_text("")
    with gzip.open(tmp_path / "d.jsonl.gz", "wb") as f:
        f.write(b'{"text": "gz good"}\n')
    cut = gzip.compress(json.dumps({"text": os.urandom(10_000).hex()}).encode())
    (tmp_path / "e.jsonl.gz").write_bytes(cut[: len(cut) // 2])
    (tmp_path / "f.jsonl").write_text(json.dumps({"text": "y" * 3000}) + "\n")
    errors: list[DataError] = []
    source = SourceConfig(name="t", path=str(tmp_path), max_document_bytes=2000)
    assert list(read_documents(source, on_error=errors.append)) == ["good 1", "good 2", "gz good"]
    where = [str(e).split(": ")[0].removeprefix(str(tmp_path) + "/") for e in errors]
    assert where == [
        "a.jsonl:2",
        "a.jsonl:3",
        "a.jsonl:4",
        "a.jsonl:5",
        "b.txt:1",
        "c.jsonl",
        "e.jsonl.gz",
        "f.jsonl:1",
    ]


def test_unknown_builtin_lists_valid_names() -> None:
    with pytest.raises(DataError, match="builtin:english, builtin:chinese, builtin:code"):
        _read("builtin:klingon")


@pytest.mark.parametrize("name", ["english", "chinese", "code"])
def test_builtin_corpora_yield_nonempty_documents(name: str) -> None:
    docs = list(itertools.islice(iter_builtin(name), 50))
    assert len(docs) == 50 and all(docs)
    assert docs == list(itertools.islice(iter_builtin(name), 50))  # deterministic


def test_builtin_chinese_is_plain_chinese_from_both_kinds() -> None:
    docs = _read("builtin:chinese", max_bytes=20_000)
    assert len(docs) >= 4
    for doc in docs:
        assert re.search(r"[\u4e00-\u9fff]", doc)
        assert not re.search(r"/[A-Za-z]{1,3}\b", doc), doc[:200]
        assert len(doc.encode("utf-8")) < 8_000
    assert any("中共中央" in d for d in docs)  # People's Daily text is in the first few docs


def test_builtin_code_is_python_source() -> None:
    docs = _read("builtin:code", max_bytes=100_000)
    assert any("def " in d for d in docs)


def test_a_100_mb_document_is_refused_by_default(tmp_path: Path) -> None:
    path = tmp_path / "dump.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"text": "short"}) + "\n")
        f.write('{"text": "' + "x" * 100_000_000 + '"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:2: document of 100,000,000 bytes")):
        list(read_documents(SourceConfig(name="t", path=str(path))))
    with pytest.raises(DataError, match=re.escape(f"{path}:2: document of 100,000,012 bytes")):
        small = SourceConfig(name="t", path=str(path), max_document_bytes=10_000_000)
        list(read_documents(small))  # a line too big even escaped is refused before parsing


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_an_enormous_line_costs_no_more_memory_than_the_cap(tmp_path: Path, suffix: str) -> None:
    """A 60 MB line (or a zstd bomb: 60 MB of one byte in a few KB) is refused without being
    held: at most a few MiB are allocated at once for a 1 MB document limit. The lines after
    it are read, and a bad byte after it is placed at its true offset."""
    import tracemalloc

    zstandard = pytest.importorskip("zstandard")
    body = b'{"text": "' + b"a" * 60_000_000 + b'"}\n{"text": "after"}\n{"text": "b\xff"}\n'
    pack = {".jsonl": bytes, ".jsonl.gz": lambda b: gzip.compress(b, 1)}
    pack[".jsonl.zst"] = zstandard.ZstdCompressor().compress
    path = tmp_path / f"bomb{suffix}"
    path.write_bytes(pack[suffix](body))
    errors: list[DataError] = []
    source = SourceConfig(name="t", path=str(path), max_document_bytes=1_000_000)
    tracemalloc.start()
    try:
        docs = list(read_documents(source, on_error=errors.append))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert docs == ["after"]
    assert len(errors) == 2
    assert f"{path}:1: document of 60,000,01" in str(errors[0])  # with or without the newline
    at = body.index(b"\xff")
    bad_byte = f"{path}:3: invalid UTF-8 byte 0xff at byte offset {at};"
    assert bad_byte in str(errors[1])
    assert peak < 48 * 2**20, f"{peak / 2**20:.0f} MiB allocated at once"


def test_json_that_is_valid_but_not_text_is_a_named_error(tmp_path: Path) -> None:
    """A BOM before the first line is no error; a lone-surrogate escape, a 5000-digit integer
    and 100,000-deep nesting are errors naming file:line, handed over in skip mode."""
    (tmp_path / "a.jsonl").write_bytes(
        b'\xef\xbb\xbf{"text": "after a BOM"}\n'
        b'{"text": "bad \\ud800 escape"}\n'
        b'{"text": "x", "n": ' + b"9" * 5000 + b"}\n"
        b'{"text": "y", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
        b'{"text": "last"}\n'
    )
    errors: list[DataError] = []
    source = SourceConfig(name="t", path=str(tmp_path / "a.jsonl"))
    assert list(read_documents(source, on_error=errors.append)) == ["after a BOM", "last"]
    assert [str(e).split(": ")[0].rsplit("/", 1)[1] for e in errors] == [
        "a.jsonl:2",
        "a.jsonl:3",
        "a.jsonl:4",
    ]
    assert "lone surrogate" in str(errors[0]) and "unreadable JSON" in str(errors[1])
    with pytest.raises(DataError, match=r"a.jsonl:2: text holds a lone surrogate"):
        _read(tmp_path / "a.jsonl")


def test_directories_skip_hidden_folders_match_suffixes_in_any_case_and_weights_are_finite(
    tmp_path: Path,
) -> None:
    _write_jsonl(tmp_path / "part1.jsonl", ["a"])
    _write_jsonl(tmp_path / "part2.JSONL", ["b"])
    (tmp_path / ".ipynb_checkpoints").mkdir()
    _write_jsonl(tmp_path / ".ipynb_checkpoints" / "part1-checkpoint.jsonl", ["copy"])
    assert _read(tmp_path) == ["a", "b"]
    with pytest.raises(DataError, match="weight must be >= 0, got nan"):
        SourceConfig(name="t", path=str(tmp_path), weight=float("nan"))


def test_a_damaged_parquet_page_is_an_error_naming_the_file(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "bad.parquet"
    texts = [f"parquet doc {i} " * 30 for i in range(3000)]
    pq.write_table(pa.table({"text": texts}), path, compression="snappy", row_group_size=500)
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = b"\xff" * 64  # inside a compressed data page
    path.write_bytes(bytes(raw))
    errors: list[DataError] = []
    source = SourceConfig(name="t", path=str(path))
    docs = list(read_documents(source, on_error=errors.append))
    assert len(docs) < len(texts) and docs == texts[: len(docs)]
    assert len(errors) == 1 and str(errors[0]).startswith(f"{path}: corrupt parquet data")


def test_max_document_bytes_counts_the_text_not_its_json_escapes(tmp_path: Path) -> None:
    """900 bytes of Chinese are ~1,800 bytes as JSON \\uXXXX escapes: under a 1,000-byte limit
    the document is kept; 1,200 bytes of text are refused, naming the line."""
    path = tmp_path / "zh.jsonl"
    path.write_text("".join(json.dumps({"text": "中" * n}) + "\n" for n in (300, 400)))
    errors: list[DataError] = []
    source = SourceConfig(name="t", path=str(path), max_document_bytes=1000)
    assert list(read_documents(source, on_error=errors.append)) == ["中" * 300]
    assert len(errors) == 1 and f"{path}:2: document of 1,200 bytes" in str(errors[0])


def test_zstd_files_of_several_frames_are_read_whole_and_a_cut_one_is_an_error(
    tmp_path: Path,
) -> None:
    """zstandard's stream reader stopped silently where a cut file ended (inside a frame),
    losing the rest of the source without a word."""
    zstandard = pytest.importorskip("zstandard")
    compress = zstandard.ZstdCompressor().compress
    texts = [f"document {i} " * 20 for i in range(400)]
    lines = [(json.dumps({"text": t}) + "\n").encode() for t in texts]
    frames = compress(b"".join(lines[:150])) + compress(b"".join(lines[150:]))
    (tmp_path / "two.jsonl.zst").write_bytes(frames)
    assert _read(tmp_path / "two.jsonl.zst") == texts
    for cut in (len(frames) // 3, len(frames) - 3):
        (tmp_path / "cut.jsonl.zst").write_bytes(frames[:cut])
        errors: list[DataError] = []
        source = SourceConfig(name="t", path=str(tmp_path / "cut.jsonl.zst"))
        docs = list(read_documents(source, on_error=errors.append))
        assert docs == texts[: len(docs)] and len(docs) < len(texts)
        assert [str(e) for e in errors] == [
            f"{tmp_path / 'cut.jsonl.zst'}: truncated zstd file (it ends inside a frame);"
            " re-compress it"
        ]


@given(st.binary(max_size=300), st.lists(st.integers(1, 40), max_size=20), st.integers(0, 30))
def test_bounded_lines_split_anywhere_give_the_lines_or_their_length(
    data: bytes, cuts: list[int], cap: int
) -> None:
    """However the stream is chunked, each line comes back whole, or as its length when longer
    than the cap."""
    from lmforge.data.byte_lines import bounded_lines

    chunks, at = [], 0
    for size in cuts:
        chunks.append(data[at : at + size])
        at += size
    chunks.append(data[at:])
    expected: list[bytes | int] = [
        line if len(line) <= cap else len(line) for line in data.split(b"\n")
    ]
    if expected and expected[-1] == b"":  # nothing after the last newline
        expected.pop()
    assert list(bounded_lines(chunks, cap)) == expected
