"""The one JSON Lines reader: blank lines skipped, a bad line named by file and line number."""

from __future__ import annotations

import pytest

from lmforge.jsonl import json_lines


class MyError(ValueError):
    pass


def test_records_with_their_line_numbers_and_bad_lines_named() -> None:
    assert list(json_lines(['{"a": 1}', "  ", "[2]"], "f.jsonl")) == [(1, {"a": 1}), (3, [2])]
    with pytest.raises(MyError, match=r"f\.jsonl:2: not valid JSON \(Expecting"):
        list(json_lines([b"{}", b"{oops"], "f.jsonl", MyError))
    with pytest.raises(ValueError, match=r"g\.jsonl:1: not valid JSON \(.*utf-8"):
        list(json_lines([b'"\xff"'], "g.jsonl"))


def test_a_bom_is_skipped_and_json_python_refuses_is_a_named_error() -> None:
    lines = ['\ufeff{"a": 1}', '{"b": 2}']
    assert list(json_lines(lines, "chat.jsonl")) == [(1, {"a": 1}), (2, {"b": 2})]
    assert list(json_lines([b'\xef\xbb\xbf{"a": 1}'], "x")) == [(1, {"a": 1})]
    for bad in ('{"n": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000):
        with pytest.raises(ValueError, match=r"chat.jsonl:2: unreadable JSON"):
            list(json_lines(['{"ok": 1}', bad], "chat.jsonl"))
