"""YAML recipes and dotted command-line overrides → one frozen, typed Recipe.

Every section is the config dataclass of the module that uses it; this loader only walks their
fields and type hints. A wrong key or type is an error naming the file and the key path, e.g.
`recipes/x.yaml: model.num_heads: expected int, got 'four'`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.data.config import DataConfig
from lmforge.data.longdata import DERIVED_SOURCES, LongDataConfig, is_derived
from lmforge.data.mixture import MixtureStage
from lmforge.data.packing import PackingConfig
from lmforge.data.sft import SFTConfig
from lmforge.data.tokenizer import TokenizerConfig
from lmforge.eval.perplexity import EvalConfig
from lmforge.generate import GenerateConfig
from lmforge.model.config import PRESETS, ModelConfig
from lmforge.train.config import TrainConfig
from lmforge.train.guard import GuardConfig
from lmforge.train.optim import OptimConfig
from lmforge.train.parallelize import ParallelConfig
from lmforge.train.schedule import ScheduleConfig
from lmforge.train.stages import RunDefaults, Stage, StageConfig, resolve_stages


class RecipeError(ValueError):
    """A recipe that does not fit the config types; the message names file and key."""


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    prompts: tuple[str, ...] = ("The Python language reference", "中国人民", "def main(")
    """Prompts sampled after training: English, Chinese, code."""


@dataclass(frozen=True, kw_only=True)
class Recipe:
    run_dir: str = "runs/demo"
    """Where every stage reads and writes: tokenizer, shards, checkpoints, metrics, export."""
    seed: int = 1337
    """Seeds model init, data order and sampling."""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    stages: tuple[StageConfig, ...] = ()
    """Training stages in order (train/stages.py); none: one run of train.max_tokens at
    packing.seq_len with the `schedule` curve."""
    long_data: LongDataConfig = field(default_factory=LongDataConfig)
    """The derived sources (long_docs, concat_docs, passkey) a stage's mixture may weight."""
    train: TrainConfig = field(default_factory=TrainConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Chat data and epochs for `lmforge sft` (instruction tuning from train.init_from)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def __post_init__(self) -> None:
        names = {s.name for s in self.data.sources}
        reserved = {name for name in names if is_derived(name)}
        if reserved:
            raise ValueError(f"data.sources: {sorted(reserved)} is reserved for derived data")
        for i, stage in enumerate(self.stages):
            unknown = {n for n in stage.mixture if n not in names and not is_derived(n)}
            if unknown:
                raise ValueError(
                    f"stages[{i}].mixture: unknown sources {sorted(unknown)}; have "
                    f"{sorted(names)} and the derived {list(DERIVED_SOURCES)}"
                )
        self.resolved_stages()  # inconsistent stages fail when the recipe loads

    def resolved_stages(self) -> tuple[Stage, ...]:
        defaults = RunDefaults(
            max_tokens=self.train.max_tokens,
            batch_tokens=self.train.batch_tokens,
            micro_batch_size=self.train.micro_batch_size,
            seq_len=self.packing.seq_len,
            rope_theta=self.model.rope_theta,
            head_dim=self.model.head_dim,
            lr=self.optim.lr,
            schedule=self.schedule,
        )
        return resolve_stages(self.stages, defaults)

    def mixture_stages(self) -> tuple[MixtureStage, ...]:
        """data.mixture_stages plus a switch at the start of each stage that sets a mixture
        (a source it leaves out keeps the weight an earlier stage gave it)."""
        switches: list[MixtureStage] = []
        weights: dict[str, float] = {}
        for stage in self.resolved_stages():
            if stage.mixture:
                weights = {**weights, **stage.mixture}
                switches.append(MixtureStage(from_tokens=stage.start, weights=weights))
        return tuple(sorted((*self.data.mixture_stages, *switches), key=lambda m: m.from_tokens))


def load_recipe(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe (None = the built-in demo defaults) and apply `a.b=value` overrides."""
    where = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise RecipeError(f"{where}: no such recipe file") from None
        except yaml.YAMLError as e:
            raise RecipeError(f"{where}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise RecipeError(
                f"{where}: a recipe is a mapping of sections, got {type(raw).__name__}"
            )
    for item in overrides:
        _apply_override(raw, item)
    return build(Recipe, raw, where, "")


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {item!r}: expected key.path=value")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {item!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(value)


def build(cls: type, raw: Any, where: str, path: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, checking every key and value type."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: {path or 'recipe'}: expected a mapping, got {raw!r}")
    raw = dict(raw)
    if cls is ModelConfig and "preset" in raw:
        raw = _with_preset(raw, where, path)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise RecipeError(f"{where}: {key_path}: unknown key; expected one of {sorted(names)}")
        kwargs[key] = _convert(hints[key], value, where, key_path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ArithmeticError) as e:
        raise RecipeError(f"{where}: {path or 'recipe'}: {e}") from None


def _with_preset(raw: dict[str, Any], where: str, path: str) -> dict[str, Any]:
    name = raw.pop("preset")
    if name not in PRESETS:
        raise RecipeError(
            f"{where}: {path}.preset: unknown preset {name!r}; one of {sorted(PRESETS)}"
        )
    return {**dataclasses.asdict(PRESETS[name]), **raw}


def _convert(hint: Any, value: Any, where: str, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where, path)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where, path)
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{where}: {path}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: {path}: expected a mapping, got {value!r}")
        return {
            _convert(args[0], k, where, f"{path}.{k}"): _convert(args[1], v, where, f"{path}.{k}")
            for k, v in value.items()
        }
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{where}: {path}: expected a list, got {value!r}")
        return tuple(_convert(args[0], v, where, f"{path}[{i}]") for i, v in enumerate(value))
    return _scalar(hint, value, where, path)


def _scalar(hint: Any, value: Any, where: str, path: str) -> Any:
    if hint is float and isinstance(value, str):
        value = _yaml11_float(value)  # PyYAML reads `3e-4` (no dot) as a string
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }
    if hint not in ok:
        raise RecipeError(f"{where}: {path}: unsupported config type {hint!r}")
    if not ok[hint]:
        raise RecipeError(f"{where}: {path}: expected {hint.__name__}, got {value!r}")
    return float(value) if hint is float else value


def _yaml11_float(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain data (lists, not tuples) for YAML/JSON, loadable again with load_recipe."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(recipe))


def save_recipe(recipe: Recipe, path: Path) -> None:
    text = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
