from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from mmops.config import (
    ConfigError,
    Params,
    SplitRatios,
    load_params,
    resolve_params,
    to_dict,
)


def write_params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_defaults_equal_the_dataclass_defaults() -> None:
    assert load_params(None) == Params()


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_params(write_params(tmp_path, "")) == Params()


def test_file_values_are_read(tmp_path: Path) -> None:
    path = write_params(
        tmp_path,
        "data:\n  dir: elsewhere\n  split: {train: 0.6, val: 0.2, test: 0.2}\n"
        "demo_data: {n: 7, seed: 3}\n"
        "validate:\n  min_split_size: {test: 2}\n  image: {max_file_mb: 1.5}\n",
    )
    params = load_params(path)
    assert params.data.dir == "elsewhere"
    assert params.data.split == SplitRatios(train=0.6, val=0.2, test=0.2)
    assert (params.demo_data.n, params.demo_data.seed) == (7, 3)
    # Keys a file leaves out keep their defaults, section by section.
    assert params.demo_data.image_size == Params().demo_data.image_size
    assert params.validate.min_split_size.test == 2
    assert params.validate.min_split_size.train == Params().validate.min_split_size.train
    assert params.validate.image.max_file_mb == 1.5


def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    path = write_params(tmp_path, "validate: {min_exampels_per_class: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert "validate.min_exampels_per_class" in message
    assert "did you mean 'min_examples_per_class'" in message
    assert str(path) in message


def test_unknown_top_level_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'validat'.*did you mean 'validate'"):
        load_params(write_params(tmp_path, "validat: {workers: 1}\n"))


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'demo_data\.n' must be int.*'abc'"):
        load_params(write_params(tmp_path, "demo_data: {n: abc}\n"))


def test_section_that_is_not_a_mapping_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'validate\.image' must be a mapping"):
        load_params(write_params(tmp_path, "validate: {image: 5}\n"))


@pytest.mark.parametrize("value", ["true", "false"])
def test_bool_is_not_an_int(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"'demo_data\.seed' must be int, got bool"):
        load_params(write_params(tmp_path, f"demo_data: {{seed: {value}}}\n"))


def test_bool_is_not_a_float(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'validate\.max_class_imbalance' must be float"):
        load_params(write_params(tmp_path, "validate: {max_class_imbalance: true}\n"))


def test_int_is_accepted_for_float(tmp_path: Path) -> None:
    params = load_params(write_params(tmp_path, "validate: {max_class_imbalance: 3}\n"))
    assert params.validate.max_class_imbalance == 3.0
    assert type(params.validate.max_class_imbalance) is float


def test_float_is_not_accepted_for_int(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'demo_data\.n' must be int"):
        load_params(write_params(tmp_path, "demo_data: {n: 2.5}\n"))


def test_labels_list_becomes_a_tuple(tmp_path: Path) -> None:
    params = load_params(write_params(tmp_path, "validate: {labels: [a, b]}\n"))
    assert params.validate.labels == ("a", "b")
    assert isinstance(params.validate.labels, tuple)


def test_labels_may_be_null(tmp_path: Path) -> None:
    assert load_params(write_params(tmp_path, "validate: {labels: null}\n")).validate.labels is None


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("validate: {labels: red}\n", r"'validate\.labels' must be a list"),
        ("validate: {labels: [red, 3]}\n", r"'validate\.labels\[1\]' must be str"),
    ],
)
def test_bad_labels_are_named(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_params(write_params(tmp_path, text))


def test_overrides_apply() -> None:
    params = load_params(
        None,
        ["validate.min_examples_per_class=3", "data.split.train=0.7", "data.split.val=0.2"],
    )
    assert params.validate.min_examples_per_class == 3
    assert params.data.split == SplitRatios(train=0.7, val=0.2, test=0.1)


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write_params(tmp_path, "demo_data: {n: 7, seed: 3}\nvalidate: {labels: [a]}\n")
    params = load_params(path, ["demo_data.n=9", "validate.labels=[x, y]"])
    assert params.demo_data == dataclasses.replace(params.demo_data, n=9, seed=3)
    assert params.validate.labels == ("x", "y")


def test_empty_override_value_is_null() -> None:
    assert load_params(None, ["validate.labels="]).validate.labels is None


def test_override_value_is_type_checked() -> None:
    with pytest.raises(ConfigError, match=r"'validate\.workers' must be int"):
        load_params(None, ["validate.workers=many"])


def test_override_of_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'validate\.wrokers'"):
        load_params(None, ["validate.wrokers=1"])


@pytest.mark.parametrize("item", ["novalue", "=3", " =3"])
def test_malformed_override_errors(item: str) -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        load_params(None, [item])


def test_override_below_a_value_errors(tmp_path: Path) -> None:
    path = write_params(tmp_path, "validate: {workers: 1}\n")
    with pytest.raises(ConfigError, match=r"'validate\.workers' is not a section"):
        load_params(path, ["validate.workers.count=2"])


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.split.train=0.7"],
        ["data.split.train=0.9", "data.split.val=0.2", "data.split.test=-0.1"],
    ],
)
def test_split_ratios_must_be_non_negative_and_sum_to_one(overrides: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"data\.split"):
        load_params(None, overrides)


@pytest.mark.parametrize("key", ["max_missing_image_rate", "max_missing_text_rate"])
def test_missing_rates_must_be_between_zero_and_one(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"data\.{key}"):
        load_params(None, [f"data.{key}=1.5"])


@pytest.mark.parametrize(
    ("override", "key"),
    [("demo_data.n=0", "demo_data.n"), ("demo_data.image_size=8", "demo_data.image_size")],
)
def test_demo_data_bounds(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_params(None, [override])


def test_config_is_frozen() -> None:
    params = load_params(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.validate = params.validate  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.validate.min_examples_per_class = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.data.split.train = 0.5  # type: ignore[misc]


def test_missing_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="file not found") as info:
        load_params(missing)
    assert str(missing) in str(info.value)


def test_invalid_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(write_params(tmp_path, "validate: [unclosed\n"))


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(write_params(tmp_path, "- a\n- b\n"))


def test_resolve_reads_params_yaml_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_params(None) == Params()
    write_params(tmp_path, "demo_data: {n: 11}\n")
    assert resolve_params(None).demo_data.n == 11
    assert resolve_params(None, ["demo_data.n=12"]).demo_data.n == 12


def test_to_dict_round_trips_through_yaml(tmp_path: Path) -> None:
    params = load_params(None, ["demo_data.n=5", "validate.image.max_file_mb=2"])
    plain = to_dict(params)
    assert plain["validate"]["image"]["max_file_mb"] == 2.0
    assert load_params(write_params(tmp_path, yaml.safe_dump(plain))) == params
