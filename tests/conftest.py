"""Fixtures for every test folder: the demo dataset and tiny CPU model params."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from mmops.config import Params, load_params
from mmops.data.demo import make_demo_data
from mmops.training.validation_gate import DataValidation


@contextmanager
def own_mlflow_store(workdir: Path, lock_dir: Path | None = None) -> Iterator[str]:
    """In `workdir`, with its own SQLite MLflow store and registry lock folder; everything
    (MLflow's tracking URI too, which `mlflow.set_tracking_uri` leaks) restored after; the
    store's URI."""
    import mlflow

    previous_uri = mlflow.get_tracking_uri()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(workdir)
            uri = f"sqlite:///{workdir / 'mlflow.db'}"
            patch.setenv("MLFLOW_TRACKING_URI", uri)
            patch.setenv("MMOPS_LOCK_DIR", str(lock_dir or workdir))
            yield uri
    finally:
        mlflow.set_tracking_uri(previous_uri)


@pytest.fixture(scope="session")
def mlflow_store() -> Callable[..., AbstractContextManager[str]]:
    """`own_mlflow_store`, for fixtures: `with mlflow_store(workdir): ...`."""
    return own_mlflow_store


# Thresholds sized for 400 rows; the defaults expect a dataset of a few thousand.
SMALL_OVERRIDES = (
    "validate.min_examples_per_class=5",
    "validate.min_split_size.train=50",
    "validate.min_split_size.val=5",
    "validate.min_split_size.test=5",
)

# A model of a few tens of thousands of parameters: an epoch on 400 rows takes about a second on
# a CPU, so behaviour, not quality, is what these params are for.
TINY_OVERRIDES = (
    *SMALL_OVERRIDES,
    "model.vision.patch_size=16",
    "model.vision.hidden_size=32",
    "model.vision.num_hidden_layers=1",
    "model.vision.num_attention_heads=2",
    "model.vision.intermediate_size=64",
    "model.text.hidden_size=32",
    "model.text.num_hidden_layers=1",
    "model.text.num_attention_heads=2",
    "model.text.intermediate_size=64",
    "model.hidden_dim=32",
    "model.fusion_layers=1",
    "model.fusion_heads=2",
    "model.vision.channels=8",
    "train.epochs=2",
    "train.min_steps=0",
    "train.batch_size=32",
    "train.num_workers=0",
    "train.device=cpu",
    "evaluate.latency_repeats=3",
    "export.latency_repeats=3",
    "evaluate.bootstrap_samples=50",
)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy machine threads contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid 400-row demo dataset; tests that change it must work on a copy."""
    out = tmp_path_factory.mktemp("demo") / "data"
    make_demo_data(out, n=400, seed=1)
    return out


@pytest.fixture(scope="session")
def validated(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[Path, Params], DataValidation]:
    """Validate a dataset as `mmops validate --out` does, and admit it as training requires."""
    from mmops.data.validate import validate_dataset
    from mmops.data.validation_report import REPORT_FILE, write_report
    from mmops.training.validation_gate import require_validation

    def validate(data_dir: Path, params: Params) -> DataValidation:
        report = validate_dataset(data_dir, params)
        assert report.success, [f"{c.name}: {c.summary()}" for c in report.failed]
        out = tmp_path_factory.mktemp("validate")
        write_report(report, out)
        return require_validation(data_dir, out / REPORT_FILE)

    return validate


@pytest.fixture(scope="session")
def demo_validation(
    demo_dir: Path, small_params: Params, validated: Callable[[Path, Params], DataValidation]
) -> DataValidation:
    """The demo dataset's passing validation: what `train` takes to train on it."""
    return validated(demo_dir, small_params)


@pytest.fixture(scope="session")
def small_overrides() -> tuple[str, ...]:
    return SMALL_OVERRIDES


@pytest.fixture(scope="session")
def small_params() -> Params:
    return load_params(None, SMALL_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_overrides() -> tuple[str, ...]:
    return TINY_OVERRIDES


@pytest.fixture(scope="session")
def tiny_params() -> Params:
    return load_params(None, TINY_OVERRIDES)


@pytest.fixture(scope="session")
def untrained_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_params: Params) -> Path:
    """An untrained tiny model folder: enough to load, nothing to learn; tests must not write
    into it."""
    from mmops.model.classifier import MultimodalClassifier, build_encoders
    from mmops.model.preprocess import train_tokenizer
    from mmops.model.storage import save_model

    config = tiny_params.model
    tokenizer = train_tokenizer(["what colour is the shape"] * 5, vocab_size=64, max_length=16)
    vision, text = build_encoders(config, len(tokenizer))
    model = MultimodalClassifier(config, 3, vision, text)
    return save_model(model, tokenizer, ["a", "b", "c"], tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(autouse=True)
def _tracking_uri_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    """`mlflow.set_tracking_uri` (called by any in-process `mmops train`) also sets
    MLFLOW_TRACKING_URI, which later tests' subprocesses (`dvc repro`) would inherit: put it back
    after each test."""
    name = "MLFLOW_TRACKING_URI"
    monkeypatch.setenv(name, os.environ.get(name, ""))
    if not os.environ[name]:
        monkeypatch.delenv(name)


def clip_checkpoint(folder: Path, vocab_texts: list[str]) -> Path:
    """A CLIP at tiny dimensions (48 px, where the demo's default image size is 64), random
    weights, with a tokenizer and an image processor beside it, as a hub checkpoint has."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from mmops.model.preprocess import train_tokenizer

    tokenizer = train_tokenizer(vocab_texts, 300, 32)
    tokenizer.save_pretrained(str(folder))
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    text = {
        **common,
        "num_attention_heads": 2,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 32,
        "eos_token_id": tokenizer.sep_token_id,
    }
    vision = {**common, "num_attention_heads": 2, "image_size": 48, "patch_size": 8}
    torch.manual_seed(0)
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    ).save_pretrained(str(folder))
    size = {"shortest_edge": 48}
    CLIPImageProcessor(size=size, crop_size={"height": 48, "width": 48}).save_pretrained(
        str(folder)
    )
    return folder


@pytest.fixture(scope="session")
def clip_run(
    demo_dir: Path,
    demo_validation: DataValidation,
    tiny_overrides: tuple[str, ...],
    tmp_path_factory: pytest.TempPathFactory,
):  # type: ignore[no-untyped-def]
    from mmops.data.dataset import load_splits

    texts = list(load_splits(demo_dir, load_params(None, tiny_overrides))["text"].dropna())
    checkpoint = clip_checkpoint(tmp_path_factory.mktemp("clip"), texts)
    params = load_params(
        None,
        [
            *tiny_overrides,
            f"model.pretrained={checkpoint}",
            "train.epochs=2",
            "train.min_steps=0",
            "train.lr=0.003",
        ],
    )
    from mmops.training.train import train

    out = tmp_path_factory.mktemp("clip-model")
    result = train(demo_dir, params, out_dir=out, progress=False, validation=demo_validation)
    return params, result


@pytest.fixture(scope="session")
def train_and_export(
    demo_dir: Path, tiny_overrides: tuple[str, ...]
) -> Callable[..., tuple[str, dict[str, str]]]:
    """A function that validates the demo data, trains a tiny model and exports it with the real
    CLI, in the working directory and MLflow store the caller set up; returns the trained
    model's URI and the export's JSON (`model_uri`, `serving`, ...)."""
    import json

    from typer.testing import CliRunner

    from mmops.cli import app

    def run(*overrides: str) -> tuple[str, dict[str, str]]:
        runner = CliRunner()
        args = [arg for item in (*tiny_overrides, *overrides) for arg in ("--set", item)]
        validate = ["validate", str(demo_dir), "--out", "reports/validate", *args]
        assert runner.invoke(app, validate).exit_code == 0  # training reads its report
        trained = runner.invoke(app, ["train", "--data", str(demo_dir), *args, "--json"])
        assert trained.exit_code == 0, trained.output
        train_uri = json.loads(trained.stdout.strip().splitlines()[-1])["model_uri"]
        command = ["export", "--data", str(demo_dir), "--model", train_uri, *args, "--json"]
        exported = runner.invoke(app, command)
        assert exported.exit_code == 0, exported.output
        return train_uri, json.loads(exported.stdout.strip().splitlines()[-1])

    return run
