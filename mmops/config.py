"""Typed, frozen configuration read from `params.yaml`, the one source of pipeline settings."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS_FILE = Path("params.yaml")


class ConfigError(ValueError):
    """A params file or override that does not fit the config schema."""


@dataclass(frozen=True)
class SplitRatios:
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1

    def __post_init__(self) -> None:
        ratios = dataclasses.asdict(self)
        if any(r < 0 for r in ratios.values()) or abs(sum(ratios.values()) - 1.0) > 1e-6:
            raise ConfigError(f"data.split: ratios must be >= 0 and sum to 1, got {ratios}")


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data/demo"
    split: SplitRatios = field(default_factory=SplitRatios)
    # A null image or text is a missing modality; 0.0 means none may be missing.
    max_missing_image_rate: float = 0.0
    max_missing_text_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_missing_image_rate", "max_missing_text_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"data.{name}: must be between 0 and 1")


@dataclass(frozen=True)
class DemoDataConfig:
    n: int = 2000
    seed: int = 0
    image_size: int = 64

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError("demo_data.n: must be >= 1")
        if not 32 <= self.image_size <= 1024:
            raise ConfigError("demo_data.image_size: must be between 32 and 1024")


@dataclass(frozen=True)
class SplitSizes:
    train: int = 50
    val: int = 10
    test: int = 10


@dataclass(frozen=True)
class ImageLimits:
    min_side: int = 16
    max_side: int = 4096
    # Checked from the header before decoding, so a decompression bomb never gets decoded.
    max_pixels: int = 16_777_216
    max_file_mb: float = 20.0


@dataclass(frozen=True)
class ValidateConfig:
    # The expected label set; null accepts any labels.
    labels: tuple[str, ...] | None = None
    min_examples_per_class: int = 10
    min_split_size: SplitSizes = field(default_factory=SplitSizes)
    text_min_chars: int = 1
    text_max_chars: int = 1000
    # Largest class count divided by the smallest.
    max_class_imbalance: float = 20.0
    image: ImageLimits = field(default_factory=ImageLimits)
    # Processes that decode images; 0 means one per CPU core.
    workers: int = 0


@dataclass(frozen=True)
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    demo_data: DemoDataConfig = field(default_factory=DemoDataConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)


def load_params(path: Path | str | None = None, overrides: Sequence[str] = ()) -> Params:
    """Read a params file (defaults when `path` is None) plus `key=value` overrides."""
    source = str(path) if path is not None else "defaults"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{source}: file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping")
        raw = loaded or {}
    for item in overrides:
        apply_override(raw, item)
    try:
        return from_mapping(Params, raw, prefix="")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def resolve_params(path: Path | str | None, overrides: Sequence[str] = ()) -> Params:
    """Load `path`, or `params.yaml` in the working directory if present, else built-in defaults."""
    if path is None and DEFAULT_PARAMS_FILE.exists():
        path = DEFAULT_PARAMS_FILE
    return load_params(path, overrides)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set a dotted `key=value` in a raw params mapping; the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key=value")
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config object (for logging and MLflow params)."""
    return dataclasses.asdict(config)


def from_mapping(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from `raw`, naming the dotted key of any unknown or mistyped value."""
    where = prefix or "top level"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"'{where}' must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{dotted}'{hint}")
    values = {
        key: _coerce(hints[key], value, f"{prefix}.{key}" if prefix else key)
        for key, value in raw.items()
    }
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"'{key}' must be a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (
        not isinstance(value, hint) or (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"'{key}' must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value
