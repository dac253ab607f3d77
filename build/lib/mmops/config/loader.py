"""Reading params.yaml and `--set` overrides into the typed sections, naming any bad key."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mmops.config.sections import ConfigError, Params

DEFAULT_PARAMS_FILE = Path("params.yaml")


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
