"""Save and load training checkpoints atomically, and verify them on load.

A checkpoint is a directory `step_00000100/` holding the model and optimizer state as a
`torch.distributed.checkpoint` folder (`state/`, one shard file per rank, reloadable at any
world size), the full model gathered into `model.safetensors` unless `consolidate` is off (what
eval, generate and export read first; without it they read `state/`), RNG states and
`trainer.json` (step, tokens, loader state, recipe), plus `MANIFEST.json` with every file's
size and sha256 (`checkpoint_dirs.py`: which folders are complete, intact, newest, best). Rank
0 writes it under a temporary name and renames it into place once every rank has written its
shard, so a kill mid-save leaves the previous checkpoint as the latest one; a truncated or
edited file fails verification with a message naming it.

Every function here is collective under torchrun: all ranks call it. With one process the
same code runs without a process group.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._pytree import tree_map

from lmforge.checkpoint_dirs import (
    FORMAT,
    STATE,
    CheckpointError,
    as_umask_allows,
    completed_checkpoints,
    fsync_dir,
    prune,
    verify_checkpoint,
    write_manifest,
)

log = logging.getLogger(__name__)


@dataclass
class TrainerState:
    step: int
    tokens: int
    loader: dict[str, Any]
    recipe: dict[str, Any]
    val_loss: float | None = None
    """Held-out loss measured at this step, if any: `keep_best` keeps the lowest."""
    guard: dict[str, Any] = field(default_factory=dict)
    """The loss-spike guard's history, so a resumed run judges spikes as before."""
    val_seq_len: int | None = None
    """The sequence length val_loss was measured at: losses at other lengths don't compare."""
    data_exhausted: bool = False
    """Training stopped here because the data ran out (before the recipe's last step)."""


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    keep_last: int = 2,
    keep_best: bool = False,
    consolidate: bool = True,
) -> Path:
    """Write `directory/step_XXXXXXXX` atomically and prune all but the newest `keep_last`
    (and, with keep_best, the one with the lowest held-out loss)."""
    args = (directory, model, optimizer, state, keep_last, keep_best)
    return start_checkpoint(*args, consolidate=consolidate).finish()


@dataclass
class PendingCheckpoint:
    """A checkpoint whose files are being written; `finish` waits for them, then writes the
    manifest and renames it into place (until then the previous checkpoint is the latest)."""

    directory: Path
    tmp: Path
    final: Path
    keep_last: int
    keep_best: bool
    writing: Future[Any] | None = None

    @property
    def written(self) -> bool:
        """This rank's files are all written (an asynchronous write has ended)."""
        return self.writing is None or self.writing.done()

    def finish(self) -> Path:
        if self.writing is not None:
            self.writing.result()
        _barrier()
        if _rank() == 0:
            write_manifest(self.tmp)
            old = self.final.with_name(f".old-{self.final.name}")
            if self.final.exists():  # the same step saved again (a rewind, a resume): moved
                shutil.rmtree(old, ignore_errors=True)  # aside, not deleted, until replaced
                self.final.rename(old)
            self.tmp.rename(self.final)
            fsync_dir(self.directory)
            shutil.rmtree(old, ignore_errors=True)
            prune(self.directory, self.keep_last, self.keep_best)
            log.info("saved checkpoint %s", self.final)
        _barrier()
        return self.final


def start_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    keep_last: int = 2,
    keep_best: bool = False,
    asynchronous: bool = False,
    consolidate: bool = True,
) -> PendingCheckpoint:
    """Write a checkpoint's files under a temporary name. Asynchronous: the sharded state is
    copied, then written by a background thread while training goes on. consolidate: also
    gather the full weights into model.safetensors on rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    final = directory / f"step_{state.step:08d}"
    tmp = directory / f".tmp-{final.name}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    full = _full_model_state(model) if consolidate else {}  # collective: onto rank 0
    sharded = {
        "model": get_model_state_dict(model),
        "optimizer": _sharded_optimizer_state(model, optimizer),
    }
    pending = PendingCheckpoint(directory, tmp, final, keep_last, keep_best)
    with _single_process_is_intended():
        if asynchronous:  # a private copy: the next optimizer steps update the live tensors
            staged = tree_map(
                lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, sharded
            )
            pending.writing = cast(
                Future,
                dcp.async_save(
                    staged,
                    checkpoint_id=tmp / STATE,
                    process_group=_checkpoint_group(),
                    no_dist=not _distributed(),
                ),
            )
        else:
            dcp.save(sharded, checkpoint_id=tmp / STATE, no_dist=not _distributed())
    if _rank() == 0:
        if consolidate:
            save_file(full, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
            as_umask_allows(tmp / "model.safetensors")
        torch.save(_rng_state(), tmp / "rng.pt")
        trainer = {
            "format": FORMAT,
            "step": state.step,
            "tokens": state.tokens,
            "loader": state.loader,
            "recipe": state.recipe,
            "val_loss": state.val_loss,
            "val_seq_len": state.val_seq_len,
            "guard": state.guard,
            "data_exhausted": state.data_exhausted,
        }
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1, ensure_ascii=False))
    return pending


_CHECKPOINT_GROUP: list[Any] = []


def _checkpoint_group() -> Any:
    """A gloo group of its own for background saves, so their collectives never interleave
    with the training step's (created once, by every rank, on the first async save)."""
    if not _distributed():
        return None
    if not _CHECKPOINT_GROUP:
        _CHECKPOINT_GROUP.append(torch.distributed.new_group(backend="gloo"))
    return _CHECKPOINT_GROUP[0]


def clear_unfinished(directory: Path) -> None:
    """Tidy what a kill mid-save left, before a run saves: `.tmp-step_*` writes are removed (no
    rank will finish them), and a step moved aside to be saved again is put back where its
    replacement never landed."""
    if _rank() == 0 and directory.is_dir():
        for old in sorted(directory.glob(".old-step_*")):
            final = old.with_name(old.name.removeprefix(".old-"))
            if final.exists():
                shutil.rmtree(old)
            else:
                old.rename(final)
                log.warning("%s: put back; the save that was to replace it did not finish", final)
        for tmp in sorted(directory.glob(".tmp-step_*")):
            log.info("removing %s, a save that did not finish", tmp)
            shutil.rmtree(tmp)
    _barrier()


def load_newest_good(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    candidates: list[Path] | None = None,
) -> tuple[Path, TrainerState]:
    """Resume from the newest checkpoint (of `candidates`, default all) that verifies; a
    corrupted one is reported and the previous one is tried, so one bad save never ends a run.
    The corrupted ones passed over are renamed `corrupt-step_*`: kept for a look, but no longer
    the newest, which pruning would keep in place of the run's new checkpoints and eval would
    read."""
    errors, bad = [], []
    for path in reversed(completed_checkpoints(directory) if candidates is None else candidates):
        try:
            state = load_checkpoint(path, model, optimizer)
        except CheckpointError as e:
            log.error("%s; falling back to the previous checkpoint", e)
            errors.append(str(e))
            bad.append(path)
            continue
        _barrier()  # every rank has verified them before they move
        if _rank() == 0:
            for corrupt in bad:
                aside = corrupt.with_name(f"corrupt-{corrupt.name}")
                corrupt.rename(aside)
                log.warning("moved the corrupted %s aside to %s", corrupt.name, aside)
        _barrier()
        return path, state
    raise CheckpointError(f"{directory}: no checkpoint can be resumed: {'; '.join(errors)}")


OPTIMIZER_SETTINGS = ("weight_decay", "betas", "eps")
"""What the optimizer was built with that a resumed run takes from its recipe, not from the
checkpoint (which set_optimizer_state_dict would restore): its moments and step counts are
the checkpoint's. The lr is set every step."""


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> TrainerState:
    """Verify, then restore the model, optimizer and RNG states; return the trainer state.

    The model may be sharded (FSDP2) or not, at any world size: DCP reshards the saved state
    to the current ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    verify_checkpoint(path)
    if optimizer is None:
        _restore_model(path, model)
    else:
        if not (path / STATE / ".metadata").exists():
            raise CheckpointError(
                f"{path}: no {STATE}/ folder (a {FORMAT} checkpoint has one); an older"
                " checkpoint's weights still load for eval/export, but it cannot be resumed"
            )
        _load_sharded_model(path, model)
        template = {"optimizer": _sharded_optimizer_state(model, optimizer)}
        with _single_process_is_intended():
            dcp.load(template, checkpoint_id=path / STATE, no_dist=not _distributed())
        wanted = [{k: g[k] for k in OPTIMIZER_SETTINGS if k in g} for g in optimizer.param_groups]
        set_optimizer_state_dict(model, optimizer, template["optimizer"])
        for group, settings in zip(optimizer.param_groups, wanted, strict=True):
            saved = {k: tuple(v) if isinstance(v, list) else v for k, v in group.items()}
            if any(saved.get(k) != v for k, v in settings.items()):
                log.info("%s: optimizer settings %s replace the checkpoint's", path, settings)
            group.update(settings)
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    trainer = json.loads((path / "trainer.json").read_text())
    return TrainerState(
        trainer["step"],
        trainer["tokens"],
        trainer["loader"],
        trainer["recipe"],
        trainer.get("val_loss"),
        trainer.get("guard", {}),
        trainer.get("val_seq_len"),
        trainer.get("data_exhausted", False),
    )


def load_model_weights(path: Path, model: nn.Module) -> dict[str, Any]:
    """Only the weights (for eval/generate/export); returns the recipe saved with them."""
    verify_checkpoint(path)
    _restore_model(path, model)
    return json.loads((path / "trainer.json").read_text())["recipe"]


def read_recipe(path: Path) -> dict[str, Any]:
    verify_checkpoint(path)
    return json.loads((path / "trainer.json").read_text())["recipe"]


def _load_sharded_model(path: Path, model: nn.Module) -> None:
    """The weights from the DCP folder, each rank reading the pieces of its own shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    template = {"model": get_model_state_dict(model)}
    try:
        with _single_process_is_intended():
            dcp.load(template, checkpoint_id=path / STATE, no_dist=not _distributed())
    except (CheckpointException, RuntimeError, ValueError) as e:  # a BaseException, a traceback
        reason = str(e).strip().splitlines()[-1]
        raise CheckpointError(f"{path / STATE}: does not fit the model: {reason}") from None
    set_model_state_dict(model, template["model"])


def _restore_model(path: Path, model: nn.Module) -> None:
    """Weights for eval/export: the consolidated file if the checkpoint has one, else DCP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not (path / "model.safetensors").exists():
        _load_sharded_model(path, model)
        return
    state: dict[str, Any] = load_file(str(path / "model.safetensors"), device="cpu")
    expected = set(_plain_keys(model))
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: model.safetensors does not fit the model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        state["lm_head.weight"] = state["embed_tokens.weight"]
    try:
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    except (RuntimeError, ValueError) as e:  # a tensor of another shape
        raise CheckpointError(f"{path}: model.safetensors does not fit the model: {e}") from None


def _plain_keys(model: nn.Module) -> list[str]:
    """Parameter/buffer names as saved: wrappers' prefixes stripped, the tied head left out."""
    keys = [k.replace("_orig_mod.", "") for k in model.state_dict()]
    return [k for k in keys if not _is_tied(model, k)]


def _full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 weights on rank 0 (gathered from FSDP shards), {} on other ranks; without the
    tied duplicate of the embedding (safetensors rejects aliases)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=_distributed())
    state = get_model_state_dict(model, options=options)
    return {
        k: v.detach().contiguous().cpu()
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and not _is_tied(model, k)
    }


def _sharded_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, each rank holding its shards."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """DCP warns on every single-process save/load; without a process group that is our plan.

    A process-wide filter rather than `catch_warnings`: an async save warns from its own
    thread after this block has exited, and `catch_warnings` is not thread-safe."""
    warnings.filterwarnings(
        "ignore", message="torch.distributed is disabled, unavailable", category=UserWarning
    )
    yield


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def _is_tied(model: nn.Module, key: str) -> bool:
    cfg = getattr(model, "cfg", None)
    return key == "lm_head.weight" and bool(getattr(cfg, "tie_embeddings", False))


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
