"""Token shards: write/read round trip and header checks that name the file."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.shards import ShardError, list_shards, open_shard, write_shard

SHA = "ab" * 32


def _docs(vocab_size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=n) for n in (5, 0, 17, 1)]


@pytest.mark.parametrize(("vocab_size", "dtype"), [(65_536, np.uint16), (100_000, np.uint32)])
def test_write_read_round_trip(tmp_path: Path, vocab_size: int, dtype: type) -> None:
    docs = _docs(vocab_size)
    docs[0][0] = vocab_size - 1
    path = tmp_path / "train_00000.bin"
    write_shard(path, docs, [10, 0, 40, 3], vocab_size, SHA)
    shard = open_shard(path)
    assert shard.tokens.dtype == dtype and not shard.tokens.flags.writeable
    assert (shard.num_docs, shard.num_tokens, shard.vocab_size) == (4, 23, vocab_size)
    assert shard.tokenizer_sha256 == SHA
    assert shard.doc_bytes.tolist() == [10, 0, 40, 3]
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(shard.document(i), doc)
    assert list(tmp_path.iterdir()) == [path]


def test_lists_of_ints_and_empty_shard(tmp_path: Path) -> None:
    write_shard(tmp_path / "a.bin", [[1, 2, 3], [4]], [3, 1], 10, SHA)
    assert open_shard(tmp_path / "a.bin").document(1).tolist() == [4]
    write_shard(tmp_path / "b.bin", [], [], 10, SHA)
    assert open_shard(tmp_path / "b.bin").num_docs == 0


def test_out_of_range_token_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="out of range"):
        write_shard(tmp_path / "a.bin", [[1, 10]], [2], 10, SHA)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ShardError, match="past 2\\^32"):  # uint32 ids would wrap to 0
        write_shard(tmp_path / "b.bin", [[2**32]], [2], 2**32 + 1, SHA)
    assert not list(tmp_path.iterdir())


def test_truncated_shard_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train_00000.bin"
    write_shard(path, _docs(1000), [1, 1, 1, 1], 1000, SHA)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-9])
    expected = f"{path}: truncated: header says {size} bytes, file has {size - 9}"
    with pytest.raises(ShardError, match=re.escape(expected)):
        open_shard(path)


def test_bad_magic_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "val_00000.bin"
    path.write_bytes(b"\0" * 300)
    with pytest.raises(ShardError, match=re.escape(f"{path}: bad magic b'\\x00")) as err:
        open_shard(path)
    assert "re-run 'lmforge tokenize'" in str(err.value)


def test_wrong_version_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    write_shard(path, [[1]], [1], 10, SHA)
    data = bytearray(path.read_bytes())
    data[8] = 7
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard version 7"):
        open_shard(path)


def test_list_shards_sorted_and_error_when_none(tmp_path: Path) -> None:
    for name in ("train_00001.bin", "train_00000.bin", "val_00000.bin"):
        write_shard(tmp_path / name, [[1]], [1], 10, SHA)
    assert [p.name for p in list_shards(tmp_path, "train")] == [
        "train_00000.bin",
        "train_00001.bin",
    ]
    with pytest.raises(ShardError, match="no test_\\*.bin shards"):
        list_shards(tmp_path, "test")


def test_a_damaged_token_id_is_an_error_naming_the_shard(tmp_path: Path) -> None:
    """The size and offsets still check out after a byte of token data is damaged; an id past
    the vocabulary is refused when its document is read, the others still read."""
    path = tmp_path / "train_00000.bin"
    docs = _docs(1000)
    write_shard(path, docs, [1, 1, 1, 1], 1000, SHA)
    raw = bytearray(path.read_bytes())
    at = 256 + 2 * 7  # the 8th token (uint16), in document 2
    raw[at : at + 2] = b"\xff\xff"
    path.write_bytes(bytes(raw))
    shard = open_shard(path)
    np.testing.assert_array_equal(shard.document(0), docs[0])
    with pytest.raises(ShardError, match=re.escape(f"{path}: document 2 holds token id 65535")):
        shard.document(2)
