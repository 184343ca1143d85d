"""Checkpoints: verified on load, atomic under a kill mid-save, pruned to the newest k."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import (
    TrainerState,
    clear_unfinished,
    load_checkpoint,
    load_model_weights,
    load_newest_good,
    save_checkpoint,
)
from lmforge.checkpoint_dirs import CheckpointError, best_checkpoint, latest_checkpoint
from lmforge.model.config import ModelConfig
from lmforge.model.llama import Llama
from lmforge.train.optim import OptimConfig, build_optimizer


def _trained(cfg: ModelConfig) -> tuple[Llama, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Llama(cfg)
    opt = build_optimizer(model, OptimConfig())
    model(torch.randint(0, cfg.vocab_size, (2, 8))).mean().backward()
    opt.step()
    return model, opt


def _save(directory: Path, model: Llama, opt: torch.optim.Optimizer, step: int) -> Path:
    state = TrainerState(step, step * 100, {"epoch": 0, "doc": step}, {"seed": 1})
    return save_checkpoint(directory, model, opt, state, keep_last=2)


def test_round_trip_restores_model_optimizer_and_state(
    tiny_cfg: ModelConfig, tmp_path: Path
) -> None:
    model, opt = _trained(tiny_cfg)
    path = _save(tmp_path, model, opt, 3)
    shared = (path / "model.safetensors").stat().st_mode & 0o777
    assert shared == (path / "trainer.json").stat().st_mode & 0o777  # not 0600 as written
    fresh = Llama(tiny_cfg)
    fresh_opt = build_optimizer(fresh, OptimConfig())
    state = load_checkpoint(path, fresh, fresh_opt)
    assert (state.step, state.tokens, state.loader) == (3, 300, {"epoch": 0, "doc": 3})
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert fresh_opt.state_dict()["state"][0]["exp_avg"].equal(
        opt.state_dict()["state"][0]["exp_avg"]
    )


def test_a_resumed_optimizer_takes_its_settings_from_the_recipe(
    tiny_cfg: ModelConfig, tmp_path: Path
) -> None:
    """Weight decay, betas and eps edited in the recipe apply after resume (the checkpoint's
    were silently restored); the moments are still the checkpoint's; no decay stays off."""
    model, opt = _trained(tiny_cfg)
    path = _save(tmp_path, model, opt, 3)
    fresh = Llama(tiny_cfg)
    edited = OptimConfig(weight_decay=0.02, beta2=0.99, eps=1e-6)
    fresh_opt = build_optimizer(fresh, edited)
    load_checkpoint(path, fresh, fresh_opt)
    settings = [(g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in fresh_opt.param_groups]
    assert settings == [(0.02, (0.9, 0.99), 1e-6), (0.0, (0.9, 0.99), 1e-6)]
    assert fresh_opt.state_dict()["state"][0]["exp_avg"].equal(
        opt.state_dict()["state"][0]["exp_avg"]
    )


def test_tied_embeddings_survive_a_round_trip(tiny_cfg: ModelConfig, tmp_path: Path) -> None:
    cfg = ModelConfig(**{**tiny_cfg.__dict__, "tie_embeddings": True})
    model, opt = _trained(cfg)
    fresh = Llama(cfg)
    load_checkpoint(_save(tmp_path, model, opt, 1), fresh)
    assert fresh.lm_head.weight is fresh.embed_tokens.weight
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("tied", [False, True])
def test_without_consolidated_weights_the_sharded_state_restores_everything(
    tiny_cfg: ModelConfig, tmp_path: Path, tied: bool
) -> None:
    cfg = ModelConfig(**{**tiny_cfg.__dict__, "tie_embeddings": tied})
    model, opt = _trained(cfg)
    state = TrainerState(3, 300, {}, {"seed": 1})
    path = save_checkpoint(tmp_path, model, opt, state, consolidate=False)
    assert not (path / "model.safetensors").exists() and (path / "state" / ".metadata").exists()
    fresh = Llama(cfg)
    fresh_opt = build_optimizer(fresh, OptimConfig())
    assert load_checkpoint(path, fresh, fresh_opt).step == 3
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    for i, per_param in opt.state_dict()["state"].items():
        for key, value in per_param.items():
            assert torch.equal(fresh_opt.state_dict()["state"][i][key], value), (i, key)
    weights_only = Llama(cfg)  # eval/export: no optimizer
    load_model_weights(path, weights_only)
    assert torch.equal(weights_only.lm_head.weight, model.lm_head.weight)
    assert (weights_only.lm_head.weight is weights_only.embed_tokens.weight) == tied
    other = Llama(ModelConfig(**{**cfg.__dict__, "d_model": 32, "num_heads": 2, "num_kv_heads": 1}))
    with pytest.raises(CheckpointError, match="state: does not fit the model"):
        load_model_weights(path, other)


def test_truncated_checkpoint_is_detected_by_name(tiny_cfg: ModelConfig, tmp_path: Path) -> None:
    model, opt = _trained(tiny_cfg)
    path = _save(tmp_path, model, opt, 1)
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load_checkpoint(path, Llama(tiny_cfg))
    weights.write_bytes(good)
    shard = path / "state" / "__0_0.distcp"  # model + optimizer state, one DCP file per rank
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"state/__0_0\.distcp: checksum mismatch"):
        load_checkpoint(path, Llama(tiny_cfg))


def test_an_edited_manifest_is_a_checkpoint_error(tiny_cfg: ModelConfig, tmp_path: Path) -> None:
    """Not a KeyError or TypeError: the loader falls back past a CheckpointError only."""
    import json

    model, opt = _trained(tiny_cfg)
    path = _save(tmp_path, model, opt, 1)
    manifest = path / "MANIFEST.json"
    good = json.loads(manifest.read_text())
    without_rng = {**good, "files": {k: v for k, v in good["files"].items() if k != "rng.pt"}}
    for edited, message in [
        ({"format": good["format"]}, "no files table"),
        ([good], "no files table"),
        ({**good, "files": {"trainer.json": "x"}}, "no files table"),
        (without_rng, "does not list rng.pt"),
    ]:
        manifest.write_text(json.dumps(edited))
        with pytest.raises(CheckpointError, match=f"MANIFEST.json: .*{message}"):
            load_checkpoint(path, Llama(tiny_cfg))


def test_kill_mid_save_leaves_the_previous_checkpoint_latest(
    tiny_cfg: ModelConfig, tmp_path: Path
) -> None:
    model, opt = _trained(tiny_cfg)
    good = _save(tmp_path, model, opt, 1)
    # what a kill during the next save leaves behind: a temp dir with partial files
    partial = tmp_path / ".tmp-step_00000002-999"
    shutil.copytree(good, partial)
    (partial / "MANIFEST.json").unlink()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    assert latest_checkpoint(tmp_path) == good
    load_checkpoint(good, Llama(tiny_cfg))  # still verifies and loads
    with pytest.raises(CheckpointError, match="MANIFEST.json: missing"):
        load_checkpoint(partial, Llama(tiny_cfg))


def test_saving_a_step_again_replaces_it_and_a_kill_midway_loses_nothing(
    tiny_cfg: ModelConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step saved again is moved aside until its replacement is in place; what a kill leaves
    (an unfinished write, a step moved aside) is tidied before the next run saves."""
    model, opt = _trained(tiny_cfg)
    first = _save(tmp_path, model, opt, 1)
    _save(tmp_path, model, opt, 2)
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    _save(tmp_path, model, opt, 2)  # e.g. a rewind redid step 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]
    again = Llama(tiny_cfg)
    load_checkpoint(tmp_path / "step_00000002", again)
    torch.testing.assert_close(again.norm.weight, model.norm.weight)

    # a kill between moving step 2 aside and renaming its new save into place ...
    rename = Path.rename

    def killed(self: Path, target: Path) -> Path:
        if self.name.startswith(".tmp-"):
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, model, opt, 2)
    monkeypatch.undo()
    assert (tmp_path / ".old-step_00000002").is_dir() and (tmp_path / ".tmp-step_00000002").is_dir()
    # ... one during a save of step 3, and a step 1 whose aside copy was not yet removed
    (tmp_path / ".tmp-step_00000003" / "state").mkdir(parents=True)
    shutil.copytree(first, tmp_path / ".old-step_00000001")
    clear_unfinished(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]
    load_checkpoint(tmp_path / "step_00000002", Llama(tiny_cfg))


def test_only_the_newest_checkpoints_are_kept(tiny_cfg: ModelConfig, tmp_path: Path) -> None:
    model, opt = _trained(tiny_cfg)
    for step in (1, 2, 3):
        _save(tmp_path, model, opt, step)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]


def test_keep_best_keeps_the_lowest_held_out_loss_too(
    tiny_cfg: ModelConfig, tmp_path: Path
) -> None:
    model, opt = _trained(tiny_cfg)
    for step, val in ((1, 3.0), (2, 1.0), (3, None), (4, 2.5)):
        state = TrainerState(step, step * 100, {}, {}, val)
        save_checkpoint(tmp_path, model, opt, state, keep_last=1, keep_best=True)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000004"]
    assert best_checkpoint(tmp_path) == tmp_path / "step_00000002"
    assert load_checkpoint(tmp_path / "step_00000002", Llama(tiny_cfg)).val_loss == 1.0


def test_keep_best_compares_losses_measured_at_the_newest_length(
    tiny_cfg: ModelConfig, tmp_path: Path
) -> None:
    """After a context extension the held-out rows are longer: a lower loss of the short stage
    is not better, and the long stage's best is kept."""
    model, opt = _trained(tiny_cfg)
    for step, val, seq_len in ((1, 1.0, 64), (2, 2.0, 256), (3, 1.5, 256), (4, 1.8, 256)):
        state = TrainerState(step, step * 100, {}, {}, val, val_seq_len=seq_len)
        save_checkpoint(tmp_path, model, opt, state, keep_last=1, keep_best=True)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]
    assert best_checkpoint(tmp_path) == tmp_path / "step_00000003"
    assert load_checkpoint(tmp_path / "step_00000003", Llama(tiny_cfg)).val_seq_len == 256


def test_resume_falls_back_past_a_corrupted_checkpoint(
    tiny_cfg: ModelConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, opt = _trained(tiny_cfg)
    for step in (1, 2):
        _save(tmp_path, model, opt, step)
    bad = tmp_path / "step_00000002" / "rng.pt"
    bad.write_bytes(bad.read_bytes()[:-1])
    fresh = Llama(tiny_cfg)
    path, state = load_newest_good(tmp_path, fresh, build_optimizer(fresh, OptimConfig()))
    assert path.name == "step_00000001" and state.step == 1
    assert "step_00000002/rng.pt: truncated" in caplog.text and "falling back" in caplog.text
    for p in fresh.state_dict():
        torch.testing.assert_close(fresh.state_dict()[p], model.state_dict()[p])
    # set aside: the run's next checkpoints are newer than the one it resumed, and kept
    assert (tmp_path / "corrupt-step_00000002" / "rng.pt").exists()
    assert latest_checkpoint(tmp_path) == path
    _save(tmp_path, model, opt, 2)
    assert [p.name for p in sorted(tmp_path.glob("step_*"))] == ["step_00000001", "step_00000002"]
    for step in (1, 2):
        (tmp_path / f"step_0000000{step}" / "trainer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no checkpoint can be resumed: .*step_00000001"):
        load_newest_good(tmp_path, fresh, build_optimizer(fresh, OptimConfig()))
    assert (tmp_path / "step_00000001").exists()  # nothing moved when nothing can be resumed


def test_checkpoint_of_another_shape_is_refused(tiny_cfg: ModelConfig, tmp_path: Path) -> None:
    model, opt = _trained(tiny_cfg)
    path = _save(tmp_path, model, opt, 1)
    other = Llama(ModelConfig(**{**tiny_cfg.__dict__, "num_layers": 3}))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_checkpoint(path, other)
