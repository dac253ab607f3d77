"""The expectation suite as a gate: the dataset the pipeline trains on must pass every check."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmops.config import load_params
from mmops.data.demo import make_demo_data
from mmops.data.validate import validate_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline's dataset if `dvc repro` made it, else the demo data its params describe."""
    params = load_params(REPO / "params.yaml")
    root = REPO / params.data.dir
    if (root / "manifest.jsonl").exists():
        return root
    demo = params.demo_data
    out = tmp_path_factory.mktemp("gate") / "demo"
    make_demo_data(out, n=demo.n, seed=demo.seed, image_size=demo.image_size)
    return out


def test_pipeline_dataset_passes_every_check(dataset: Path) -> None:
    report = validate_dataset(dataset, load_params(REPO / "params.yaml"))
    failures = "\n".join(f"{c.name}: {c.summary()}" for c in report.failed)
    assert report.success, f"{dataset} fails validation:\n{failures}"
    assert report.stats["rows"] > 0
