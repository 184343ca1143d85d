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
