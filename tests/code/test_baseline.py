"""The classical baseline on a tiny dataset, the underfit check, and the gate against the
baseline, on plain data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmops.config import GateConfig, Params, load_params
from mmops.evaluation.baseline import (
    CANDIDATES,
    fit_baseline,
    training_curve,
    underfit,
    underfit_hint,
)
from mmops.evaluation.records import (
    Ablation,
    BaselineResult,
    Calibration,
    ClassificationMetrics,
    Efficiency,
    EvaluationReport,
)
from mmops.tracking.gate import Score, gate
from mmops_flows.support import RetrainResult, summary_markdown

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90 rows whose label is the image's colour; a few images and texts are missing."""
    root = tmp_path_factory.mktemp("colours")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(90):
        label = list(COLOURS)[i % 3]
        split = "train" if i < 60 else "val" if i < 75 else "test"
        noise = rng.integers(-30, 30, (12, 12, 3))
        pixels = np.clip(np.array(COLOURS[label]) + noise, 0, 255).astype(np.uint8)
        image = f"images/{i}.png"
        Image.fromarray(pixels).save(root / image)
        rows.append(
            {
                "id": f"c{i}",
                "image": None if i in (3, 7) else image,
                "text": None if i % 10 == 0 else f"what colour is shape {i % 7}",
                "label": label,
                "split": split,
            }
        )
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def params() -> Params:
    return load_params(None, ["evaluate.baseline.image_size=4", "evaluate.baseline.max_vocab=50"])


def test_baseline_learns_a_separable_dataset_and_says_what_it_is(
    colour_data: Path, params: Params
) -> None:
    result = fit_baseline(colour_data, params)

    assert result.kind in CANDIDATES and set(result.candidates) == set(CANDIDATES)
    assert result.val_accuracy == result.candidates[result.kind]
    assert result.test_accuracy == 1.0 and result.test_macro_f1 == 1.0
    assert result.train_examples == 60
    # 4x4 RGB pixels plus the words and bigrams of the train texts.
    assert result.n_features > 4 * 4 * 3
    saved = json.loads(json.dumps(result.to_dict()))
    assert "pipeline" not in saved and saved["kind"] == result.kind
    assert "pipeline" not in repr(result)


def test_baseline_is_deterministic(colour_data: Path, params: Params) -> None:
    first, again = fit_baseline(colour_data, params), fit_baseline(colour_data, params)
    assert first.to_dict() | {"seconds": 0} == again.to_dict() | {"seconds": 0}


def score(accuracy: float) -> Score:
    return Score("2", accuracy, {}, 0.0, 10.0, "int8", [True])


def baseline(test_accuracy: float, kind: str = "mlp") -> BaselineResult:
    return BaselineResult(kind, 0.9, test_accuracy, 0.9, {"logistic": 0.5, kind: 0.9}, 100, 10, 1.0)


def test_gate_rejects_a_challenger_below_the_baseline_naming_both_figures() -> None:
    verdict = gate(score(0.85), None, GateConfig(), baseline(0.9))

    assert not verdict.passed
    (reason,) = verdict.reasons
    assert "0.8500" in reason and "0.9000" in reason and "mlp" in reason
    assert "gate.min_gain_over_baseline" in reason
    assert "| gain over baseline (mlp, accuracy 0.9000) | -0.0500 | - |" in verdict.table()


def test_gate_asks_for_the_configured_gain_over_the_baseline() -> None:
    assert gate(score(0.9), None, GateConfig(), baseline(0.9)).passed
    strict = GateConfig(min_gain_over_baseline=0.05)
    verdict = gate(score(0.93), None, strict, baseline(0.9))
    assert not verdict.passed and "needs 0.9500" in verdict.reasons[0]
    assert gate(score(0.96), None, strict, baseline(0.9)).passed


def test_gate_without_a_baseline_has_no_baseline_row() -> None:
    verdict = gate(score(0.9), None, GateConfig())
    assert verdict.passed and verdict.baseline is None
    assert "baseline" not in verdict.table()


def test_underfit_fires_at_chance_and_not_for_a_model_that_learnt() -> None:
    counts = {"a": 500, "b": 300, "c": 200}
    at_chance = underfit(0.5, counts)
    assert at_chance is not None
    assert at_chance.chance == 0.5
    # Two binomial standard errors at p = 0.5, n = 1000: 0.0316, above the 2-point floor.
    assert at_chance.margin == pytest.approx(2 * (0.25 / 1000) ** 0.5)
    assert underfit(0.53, counts) is not None  # within the margin: not clearly above chance
    assert underfit(0.9, counts) is None
    # On many examples the margin never falls below 2 points.
    many = underfit(0.51, {"a": 10**6, "b": 10**6})
    assert many is not None and many.margin == 0.02


def test_underfit_hint_reads_the_training_curve() -> None:
    flat = [{"epoch": 1, "train_accuracy": 0.3, "val_accuracy": 0.3}]
    assert "not learnt even its training data" in underfit_hint(flat, threshold=0.4)
    memorised = [
        {"epoch": 1, "train_accuracy": 0.6, "val_accuracy": 0.31},
        {"epoch": 2, "train_accuracy": 0.99, "val_accuracy": 0.35},
    ]
    hint = underfit_hint(memorised, threshold=0.4)
    assert "fits its training data" in hint and "still rising" in hint
    for remedy in ("train.search", "train.epochs", "pretrained"):
        assert remedy in hint and remedy in underfit_hint([], threshold=0.4)


def test_training_curve_is_the_history_beside_the_model_folder(tmp_path: Path) -> None:
    assert training_curve(tmp_path / "model") == []
    epoch = {"epoch": 1, "train_loss": 2.1, "val_accuracy": 0.2, "epoch_seconds": 3.0}
    (tmp_path / "history.json").write_text(json.dumps({"history": [epoch]}))

    assert training_curve(tmp_path / "model") == [
        {"epoch": 1.0, "train_loss": 2.1, "val_accuracy": 0.2}
    ]


def test_retrain_summary_shows_the_baseline_and_the_underfit_report() -> None:
    curve = [{"epoch": 1, "train_loss": 2.2, "train_accuracy": 0.3, "val_accuracy": 0.3}]
    report = EvaluationReport(
        test_examples=1000,
        classification=ClassificationMetrics(0.5, 0.2, {}, []),
        ablation=Ablation(0.5, 0.5, 0.5),
        robustness={},
        calibration=Calibration(0.0, 10, []),
        efficiency=Efficiency("cpu", "torch", {}, 0.0, 0, 0.0),
        baseline=baseline(0.9),
        underfit=underfit(0.5, {"a": 500, "b": 500}, curve),
    )
    verdict = gate(score(0.5), None, GateConfig(min_accuracy=0.0), report.baseline)
    result = RetrainResult("m", "2", "run", "md5", False, verdict, report, "int8", None)

    summary = summary_markdown(result)

    assert "## Baseline" in summary and "| baseline (mlp) | 0.9000 |" in summary
    assert "**-0.4000**" in summary
    assert "## Underfit" in summary and "| 1 | 2.2000 | 0.3000 | - | 0.3000 |" in summary
    assert result.to_dict()["baseline"]["test_accuracy"] == 0.9
    assert result.to_dict()["underfit"]["chance"] == 0.5
    assert "does not beat the mlp baseline" in summary
