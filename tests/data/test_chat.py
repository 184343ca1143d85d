"""Chat formats, the template (equal to transformers' apply_chat_template on the exported
tokenizer), loss masks on assistant tokens only, and packed SFT rows that equal unpacked ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from lmforge.data.chat import (
    IM_END,
    ChatFormatError,
    Message,
    read_chat_records,
    render,
    special_id,
    to_messages,
)
from lmforge.data.packing import IGNORE_INDEX
from lmforge.data.sft import SFTConfig, SFTLoader, load_sft_data
from lmforge.data.tokenizer import TextTokenizer
from lmforge.export import _write_tokenizer
from lmforge.model.config import ModelConfig
from lmforge.model.llama import Llama

SHARED_SFT = Path(__file__).resolve().parents[3] / "shared" / "data" / "sft"

TURNS = [
    Message("system", "You are terse."),
    Message("user", "Name a prime."),
    Message("assistant", "7"),
    Message("user", "另一个？"),
    Message("assistant", "十一 (11).\n"),
]

FORMATS = {
    "messages": {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "另一个？"},
            {"role": "assistant", "content": "十一 (11).\n"},
        ]
    },
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": "You are terse."},
            {"from": "human", "value": "Name a prime."},
            {"from": "gpt", "value": "7"},
            {"from": "human", "value": "另一个？"},
            {"from": "gpt", "value": "十一 (11).\n"},
        ]
    },
    "alpaca_with_history": {
        "system": "You are terse.",
        "history": [["Name a prime.", "7"]],
        "instruction": "另一个？",
        "input": "",
        "output": "十一 (11).\n",
    },
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_gives_the_same_conversation(name: str) -> None:
    assert to_messages(FORMATS[name], "x.jsonl:1") == TURNS


def test_alpaca_input_and_prompt_completion() -> None:
    alpaca = {"instruction": "Translate.", "input": "chat", "output": "猫"}
    assert to_messages(alpaca, "a") == [
        Message("user", "Translate.\n\nchat"),
        Message("assistant", "猫"),
    ]
    dolly = {"instruction": "Sum.", "context": "2 and 2", "response": "4", "category": "qa"}
    assert to_messages(dolly, "d")[0] == Message("user", "Sum.\n\n2 and 2")
    pair = {"prompt": "2+2=", "answer": "4"}
    assert to_messages(pair, "a") == [Message("user", "2+2="), Message("assistant", "4")]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([1, 2], "x.jsonl:3: expected a JSON object"),
        ({"text": "hi"}, "x.jsonl:3: no chat format fits keys \\['text'\\]"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "unknown speaker 'wizard'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"instruction": "a", "output": 3}, "'output' must be a string"),
        ({"instruction": "a", "output": "b", "history": [["x"]]}, "history\\[0\\]"),
    ],
)
def test_bad_records_are_named(record: object, message: str) -> None:
    with pytest.raises(ChatFormatError, match=message):
        to_messages(record, "x.jsonl:3")


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "b"}\n{"prompt": \n')
    with pytest.raises(ChatFormatError, match="chat.jsonl:2: not valid JSON"):
        list(read_chat_records(path))


@pytest.fixture(scope="module")
def tokenizer(prepared_run: Path) -> TextTokenizer:
    return TextTokenizer.load(prepared_run / "tokenizer.json")


@pytest.fixture(scope="module")
def hf_tokenizer(prepared_run: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    folder = tmp_path_factory.mktemp("hf_tok")
    special = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
    _write_tokenizer(folder, prepared_run / "tokenizer.json", special, 512, 64)
    return AutoTokenizer.from_pretrained(folder)


def shared_conversations() -> list[list[Message]]:
    files = [
        "alpaca_demo_llamafactory/alpaca_en_demo.json",
        "alpaca_demo_llamafactory/alpaca_zh_demo.json",
        "oasst1_zh_llamafactory/oaast_sft_zh.json",
    ]
    out = []
    for name in files:
        records = list(read_chat_records(SHARED_SFT / name))[:20]
        out += [to_messages(r, where) for where, r in records]
    return out


def test_template_equals_apply_chat_template(
    tokenizer: TextTokenizer, hf_tokenizer: object
) -> None:
    leading = ["\nHello", "\n\n  Hi\n", "  \nx", "\r\nx", " x", "\t\n", "", "\n"]
    conversations = [TURNS, *([Message("user", c), Message("assistant", c)] for c in leading)]
    if SHARED_SFT.is_dir():
        conversations += shared_conversations()
    for turns in conversations:
        plain = [{"role": m.role, "content": m.content} for m in turns]
        for prompt in (False, True):
            ids, _ = render(turns, tokenizer, add_generation_prompt=prompt)
            theirs = hf_tokenizer.apply_chat_template(  # type: ignore[attr-defined]
                plain, tokenize=True, add_generation_prompt=prompt
            )
            if hasattr(theirs, "keys"):  # newer transformers return a BatchEncoding
                theirs = theirs["input_ids"]
            assert ids.tolist() == list(theirs)


def test_loss_mask_covers_assistant_turns_only(tokenizer: TextTokenizer) -> None:
    ids, mask = render(TURNS, tokenizer)
    end = special_id(IM_END)
    learned = tokenizer.decode([int(t) for t in ids[mask] if t != end])
    assert learned == "7" + "十一 (11).\n"
    assert int((ids[mask] == end).sum()) == 2  # each assistant turn learns to end itself
    assert not mask[0] and int((ids == end).sum()) == 5


def sft_file(tmp_path: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "chat.jsonl"
    with path.open("w") as f:
        for i in range(n):
            words = " ".join(["word"] * int(rng.integers(1, 30)))
            turns = [{"role": "user", "content": f"q{i} {words}"}]
            turns.append({"role": "assistant", "content": f"a{i} " + words[: 3 * i]})
            if i % 3 == 0:
                turns += [
                    {"role": "user", "content": "more"},
                    {"role": "assistant", "content": "ok"},
                ]
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


def test_packed_rows_give_the_loss_of_unpacked_ones(
    tokenizer: TextTokenizer, tmp_path: Path
) -> None:
    data = load_sft_data(
        SFTConfig(paths=(str(sft_file(tmp_path)),), heldout_fraction=0), tokenizer, 128
    )
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=512, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, d_ff=128
    )
    model = Llama(cfg).eval()

    def summed_loss(pack: bool) -> tuple[float, int, int]:
        loader = SFTLoader(data.train, 128, 4, tokenizer.pad_id, epochs=1, shuffle=False, pack=pack)
        total, targets, rows = 0.0, 0, 0
        with torch.no_grad():
            for batch in loader:
                total += float(model(batch.input_ids, batch.positions, labels=batch.labels))
                targets += batch.num_targets
                rows += len(batch.input_ids)
        return total, targets, rows

    packed, unpacked = summed_loss(True), summed_loss(False)
    assert packed[1] == unpacked[1] == data.counts["train_targets"]
    assert packed[2] < unpacked[2] == 24  # fewer rows when packed
    assert packed[0] == pytest.approx(unpacked[0], rel=1e-5)


def test_truncation_is_counted_and_drop_leaves_out(
    tokenizer: TextTokenizer, tmp_path: Path
) -> None:
    path = str(sft_file(tmp_path))
    truncated = load_sft_data(SFTConfig(paths=(path,), heldout_fraction=0), tokenizer, 48)
    dropped = load_sft_data(
        SFTConfig(paths=(path,), heldout_fraction=0, truncation="drop"), tokenizer, 48
    )
    assert truncated.counts["truncated"] > 0 and dropped.counts["dropped"] > 0
    assert all(len(c.ids) <= 49 for c in truncated.train)
    assert dropped.counts["train"] + dropped.counts["dropped"] == 24


def test_loader_resumes_and_resplits_over_ranks(tokenizer: TextTokenizer, tmp_path: Path) -> None:
    data = load_sft_data(
        SFTConfig(paths=(str(sft_file(tmp_path)),), heldout_fraction=0), tokenizer, 64
    )

    def loader(rank: int = 0, world: int = 1) -> SFTLoader:
        return SFTLoader(
            data.train, 64, 2, tokenizer.pad_id, epochs=2.5, rank=rank, world_size=world
        )

    whole = torch.cat([b.input_ids for b in loader()])
    lengths = loader().epoch_lengths()
    assert len(lengths) == 3
    assert len(whole) == loader().total_rows == sum(lengths[:2]) + int(np.ceil(0.5 * lengths[2]))
    first, rest = loader(), loader()
    it = iter(first)
    head = [next(it).input_ids for _ in range(3)]
    rest.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = [b.input_ids for b in rest]
    assert torch.equal(torch.cat(head + tail), whole)
    two = [torch.cat([b.input_ids for b in loader(r, 2)]) for r in (0, 1)]
    assert torch.equal(two[0], whole[0::2]) and torch.equal(two[1], whole[1::2])
    assert (whole[:, 0] == tokenizer.bos_id).all()
    assert not torch.equal(whole[: lengths[0]][0], whole[lengths[0] :][0])
    assert IGNORE_INDEX == -100
    # tokens consumed: what the rows hold, padding left out, the same after a resume
    real = int((whole != tokenizer.pad_id).sum())
    assert first.consumed_tokens() != rest.consumed_tokens() == {"sft": [real]}
    assert real < whole.numel()


def test_a_stage_cannot_change_the_length_sft_rows_are_packed_at(
    tokenizer: TextTokenizer, tmp_path: Path
) -> None:
    """The position is a row of the plan packed at one length: another length would skip or
    repeat conversations, so it is refused once rows were read (the batch size may change)."""
    data = load_sft_data(
        SFTConfig(paths=(str(sft_file(tmp_path)),), heldout_fraction=0), tokenizer, 64
    )
    loader = SFTLoader(data.train, 32, 2, tokenizer.pad_id, epochs=1)
    loader.reshape(64, 2)  # before the first row: fine
    next(iter(loader))
    loader.reshape(64, 4)
    with pytest.raises(ValueError, match="packed at seq_len 64; a stage cannot change it to 32"):
        loader.reshape(32, 4)


def test_every_conversation_is_trained_on_once_per_epoch(
    tokenizer: TextTokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each epoch packs its own order into its own number of rows; rows must be placed by
    each epoch's count, not the first one's, or conversations are skipped or repeated."""
    from lmforge.data import sft

    data = load_sft_data(
        SFTConfig(paths=(str(sft_file(tmp_path)),), heldout_fraction=0), tokenizer, 128
    )
    trained: list[int] = []
    build = sft.build_row
    monkeypatch.setattr(
        sft,
        "build_row",
        lambda convs, members, *a: trained.extend(members) or build(convs, members, *a),
    )
    counts = set()
    for seed in range(6):
        trained.clear()
        loader = SFTLoader(data.train, 128, 2, tokenizer.pad_id, epochs=3, seed=seed)
        rows = sum(len(b.input_ids) for b in loader)
        assert rows == loader.total_rows == sum(loader.epoch_lengths())
        assert sorted(trained) == sorted(list(range(len(data.train))) * 3)
        counts.add(tuple(loader.epoch_lengths()))
    assert any(len(set(c)) > 1 for c in counts)  # some seed packs epochs into different counts
