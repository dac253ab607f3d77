"""The hyperparameter search space in params.yaml (`train.search.space`): checked, sampled, applied.

An entry maps a dotted params key to `{low, high[, log][, step]}` or `{choices: [...]}`. A space
is checked against the params before any trial runs: every key must name a params value, and
every bound and choice must make valid params, so a bad space fails in a second, naming its key.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmops.config import ConfigError, Params, from_mapping, to_dict

RANGE_FIELDS = ("low", "high", "log", "step")
FIELDS = (*RANGE_FIELDS, "choices")
SEARCH_KEY = "train.search"


@dataclass(frozen=True)
class Dimension:
    """One searched params key: a numeric range (int when both bounds are) or a list of choices."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    integer: bool = False

    def extremes(self) -> dict[str, Any]:
        """The values that must each make valid params, by the field they come from."""
        if self.choices:
            return {f"choices[{i}]": value for i, value in enumerate(self.choices)}
        return {"low": self.low, "high": self.high}

    def suggest(self, trial: Any) -> Any:
        """This key's value for an Optuna trial."""
        if self.choices:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            step = int(self.step or 1)
            return trial.suggest_int(self.key, self.low, self.high, step=step, log=self.log)
        return trial.suggest_float(
            self.key, float(self.low), float(self.high), step=self.step, log=self.log
        )


def parse_space(params: Params) -> tuple[Dimension, ...]:
    """The search space of `params`, each key and value checked against the params themselves."""
    leaves = _leaves(to_dict(params))
    dims = []
    for key, entry in params.train.search.space.items():
        where = f"{SEARCH_KEY}.space[{key!r}]"
        _check_key(str(key), leaves, where)
        dim = _dimension(str(key), entry, where, integer_field=not isinstance(leaves[key], float))
        for name, value in dim.extremes().items():
            try:
                with_overrides(params, {dim.key: value})
            except ConfigError as exc:
                raise ConfigError(
                    f"{where}: {name}={value!r} makes the params invalid: {exc}"
                ) from None
        dims.append(dim)
    if not dims:
        raise ConfigError(f"{SEARCH_KEY}.space: empty; name at least one params key to search")
    return tuple(dims)


def with_overrides(params: Params, overrides: Mapping[str, Any]) -> Params:
    """New params with dotted keys set to values, checked like a params file."""
    raw = to_dict(params)
    for key, value in overrides.items():
        _set(raw, key, value)
    return from_mapping(Params, raw, prefix="")


def write_params_file(path: Path, overrides: Mapping[str, Any]) -> Path:
    """A partial params file (params.yaml's structure) holding only `overrides`."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        _set(nested, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Best values of `mmops tune`; train with them: mmops train --set KEY=VALUE ...\n"
    path.write_text(header + yaml.safe_dump(nested, sort_keys=False))
    return path


def read_params_file(path: Path | str) -> dict[str, Any]:
    """The dotted keys and values of a partial params file such as best_params.yaml."""
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return _leaves(loaded)


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """`key=value` items for `--set` (or `dvc exp run -S`) that load back to the same values."""
    return [f"{key}={_yaml_scalar(value)}" for key, value in overrides.items()]


def _yaml_scalar(value: Any) -> str:
    # safe_dump writes 1e-05 as 1.0e-05: YAML 1.1, as yaml.safe_load reads it, needs the dot.
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("...\n").strip()


def _leaves(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every non-mapping value below `config`."""
    found: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            found.update(_leaves(value, name))
        else:
            found[name] = value
    return found


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    node = raw
    for i, part in enumerate(sections):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{'.'.join(sections[: i + 1])}' is not a section")
    node[leaf] = value


def _check_key(key: str, leaves: Mapping[str, Any], where: str) -> None:
    searchable = [k for k in leaves if not k.startswith(f"{SEARCH_KEY}.")]
    if key.startswith(f"{SEARCH_KEY}.") or key == SEARCH_KEY:
        raise ConfigError(f"{where}: the search cannot search its own settings")
    if key in searchable:
        return
    below = [k for k in searchable if k.startswith(f"{key}.")]
    if below:
        raise ConfigError(f"{where}: {key!r} is a section; name one of its keys, e.g. {below[0]!r}")
    close = difflib.get_close_matches(key, searchable, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{where}: unknown params key {key!r}{hint}")


def _dimension(key: str, entry: Mapping[str, Any], where: str, integer_field: bool) -> Dimension:
    for name in entry:
        if name not in FIELDS:
            close = difflib.get_close_matches(str(name), FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{where}: unknown field {name!r}{hint}; give {{low, high}} or {{choices}}"
            )
    if "choices" in entry:
        return _choices(key, entry, where)
    if "low" not in entry or "high" not in entry:
        raise ConfigError(f"{where}: give both low and high, or choices")
    low, high, step = entry["low"], entry["high"], entry.get("step")
    for name, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            # PyYAML reads 1e-4 (no dot) as text.
            hint = " (YAML reads 1e-4 as text: write 1.0e-4)" if isinstance(value, str) else ""
            raise ConfigError(f"{where}: {name} must be a number, got {value!r}{hint}")
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    if not low < high:
        raise ConfigError(f"{where}: low must be < high, got low={low!r}, high={high!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low!r}")
    if step is not None and (step <= 0 or log):
        raise ConfigError(f"{where}: step must be > 0 and cannot be combined with log")
    integer = integer_field and isinstance(low, int) and isinstance(high, int)
    if integer and step is not None and not isinstance(step, int):
        raise ConfigError(f"{where}: step must be an int when low and high are, got {step!r}")
    return Dimension(key, low, high, log, step, integer=integer)


def _choices(key: str, entry: Mapping[str, Any], where: str) -> Dimension:
    choices = entry["choices"]
    if len(entry) > 1:
        raise ConfigError(
            f"{where}: choices cannot be combined with {sorted(set(entry) - {'choices'})}"
        )
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}: choices must be a non-empty list, got {choices!r}")
    for i, value in enumerate(choices):
        if value is not None and not isinstance(value, bool | int | float | str):
            raise ConfigError(f"{where}: choices[{i}] must be a number, string, bool or null")
    return Dimension(key, choices=tuple(choices))
