from __future__ import annotations

import csv
import json
import posixpath
import re
from pathlib import Path

import numpy as np
import pytest

from mmops.config import Params, load_params
from mmops.data.dataset import load_splits
from mmops.evaluation.evaluate import evaluate_model
from mmops.evaluation.metrics import (
    calibration,
    classification_metrics,
    flat_metrics,
    flatten,
    retrieval_recall,
)
from mmops.evaluation.predictions import Predictions
from mmops.evaluation.records import CalibrationBin, ClassMetrics, EvaluationReport
from mmops.evaluation.report import (
    CALIBRATION_CSV,
    CONFUSION_CSV,
    METRICS_FILE,
    REPORT_FILE,
)
from mmops.training.train import TrainResult, train
from mmops.training.validation_gate import DataValidation

PERTURBATIONS = ("image_noise", "image_blur", "text_typos", "missing_image", "missing_text")
# What MLflow accepts in a metric name (it also allows ':', except on Windows).
MLFLOW_KEY = re.compile(r"^[\w\-./ ]+$")


def is_mlflow_key(key: str) -> bool:
    # MLflow also rejects names that a path normalisation would change, such as "a//b".
    return bool(MLFLOW_KEY.match(key)) and posixpath.normpath(key) == key


@pytest.fixture(scope="module")
def evaluated(
    trained_run: TrainResult,
    demo_dir: Path,
    train_params: Params,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[EvaluationReport, Path]:
    out = tmp_path_factory.mktemp("evaluate")
    return evaluate_model(trained_run.model_dir, demo_dir, train_params, out), out


@pytest.fixture(scope="module")
def test_size(demo_dir: Path, train_params: Params) -> int:
    frame = load_splits(demo_dir, train_params)
    return int((frame["split"] == "test").sum())


def test_quality_metrics(
    evaluated: tuple[EvaluationReport, Path], trained_run: TrainResult, test_size: int
) -> None:
    report, _ = evaluated
    metrics = report.classification

    assert report.test_examples == test_size
    assert 0.0 <= metrics.accuracy <= 1.0
    assert 0.0 <= metrics.macro_f1 <= 1.0
    assert set(metrics.per_class) == set(trained_run.labels)
    assert sum(c.support for c in metrics.per_class.values()) == test_size
    matrix = np.array(metrics.confusion_matrix)
    assert matrix.shape == (len(trained_run.labels),) * 2
    assert matrix.sum() == test_size
    assert np.trace(matrix) / test_size == pytest.approx(metrics.accuracy)


def test_ablation_and_robustness(evaluated: tuple[EvaluationReport, Path]) -> None:
    report, _ = evaluated
    ablation, robustness = report.ablation, report.robustness

    assert set(report.to_dict()["ablation"]) == {"both", "image_only", "text_only"}
    assert ablation.both == report.classification.accuracy
    assert set(robustness) == set(PERTURBATIONS)
    for name, result in robustness.items():
        assert 0.0 <= result.accuracy <= 1.0, name
        assert result.drop == pytest.approx(ablation.both - result.accuracy), name
    assert robustness["missing_image"].accuracy == ablation.text_only
    assert robustness["missing_text"].accuracy == ablation.image_only


def test_group_slices(evaluated: tuple[EvaluationReport, Path], test_size: int) -> None:
    groups = evaluated[0].groups
    assert groups is not None

    assert set(groups.accuracy) == {"studio", "field"}
    assert sum(groups.counts.values()) == test_size
    accuracies = groups.accuracy.values()
    assert groups.max_gap == pytest.approx(max(accuracies) - min(accuracies))
    for low, high in (groups.max_gap_ci95, groups.accuracy_ci95):
        assert 0.0 <= low <= high <= 1.0


def test_calibration_retrieval_and_efficiency(
    evaluated: tuple[EvaluationReport, Path], train_params: Params, test_size: int
) -> None:
    report, _ = evaluated
    calib, efficiency = report.calibration, report.efficiency

    assert 0.0 <= calib.ece <= 1.0
    assert sum(b.count for b in calib.curve) == test_size
    # The trained run used a contrastive term, so retrieval is reported.
    assert report.retrieval is not None
    assert all(0.0 <= v <= 1.0 for v in report.retrieval.values())
    assert set(efficiency.latency) == {"1", "8", "32"}
    for latency in efficiency.latency.values():
        assert 0 < latency["p50_ms"] <= latency["p95_ms"]
        assert latency["throughput_per_s"] > 0
    assert efficiency.parameters > 0
    assert efficiency.model_size_mb > 0
    assert efficiency.device == "cpu"


def test_evaluation_files(
    evaluated: tuple[EvaluationReport, Path], trained_run: TrainResult, test_size: int
) -> None:
    metrics, out = evaluated

    for name in (METRICS_FILE, REPORT_FILE, "confusion_matrix.png", "reliability.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / METRICS_FILE).read_text()) == json.loads(json.dumps(metrics.to_dict()))
    report = (out / REPORT_FILE).read_text()
    assert f"**Accuracy {metrics.classification.accuracy:.4f}**" in report
    assert "![confusion matrix](confusion_matrix.png)" in report
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == test_size
    first = json.loads(lines[0])
    assert first["label"] in trained_run.labels
    assert set(first["scores"]) == set(trained_run.labels)
    assert sum(first["scores"].values()) == pytest.approx(1.0, abs=1e-4)


def test_plots_as_data_for_dvc(
    evaluated: tuple[EvaluationReport, Path], demo_dir: Path, train_params: Params
) -> None:
    report, out = evaluated
    frame = load_splits(demo_dir, train_params)
    truth = frame[frame["split"] == "test"]["label"].tolist()
    served = [json.loads(line)["label"] for line in (out / "predictions.jsonl").open()]

    with (out / CONFUSION_CSV).open(newline="") as f:
        examples = list(csv.DictReader(f))
    assert [(e["actual"], e["predicted"]) for e in examples] == list(
        zip(truth, served, strict=True)
    )
    matrix = np.array(report.classification.confusion_matrix)
    assert sum(e["actual"] == e["predicted"] for e in examples) == np.trace(matrix)

    with (out / CALIBRATION_CSV).open(newline="") as f:
        bins = list(csv.DictReader(f))
    assert list(bins[0]) == ["bin", "confidence", "accuracy", "count"]
    assert [
        (int(b["bin"]), float(b["confidence"]), float(b["accuracy"]), int(b["count"])) for b in bins
    ] == [(b.bin, b.confidence, b.accuracy, b.count) for b in report.calibration.curve]


def test_baseline_is_reported_beside_the_model(evaluated: tuple[EvaluationReport, Path]) -> None:
    report, out = evaluated
    baseline = report.baseline
    assert baseline is not None

    assert baseline.kind in ("logistic", "mlp")
    assert 0.0 <= baseline.test_accuracy <= 1.0
    saved = json.loads((out / METRICS_FILE).read_text())["baseline"]
    assert saved["test_accuracy"] == baseline.test_accuracy
    assert saved["gain"] == pytest.approx(report.classification.accuracy - baseline.test_accuracy)
    assert (
        f"| baseline ({baseline.kind}) | {baseline.test_accuracy:.4f} |"
        in (out / REPORT_FILE).read_text()
    )


def test_a_model_at_chance_is_reported_as_underfit_with_its_curve(
    demo_dir: Path,
    demo_validation: DataValidation,
    tiny_overrides: tuple[str, ...],
    tmp_path: Path,
) -> None:
    # One epoch at a learning rate that moves no weight: a model that has learnt nothing.
    params = load_params(None, [*tiny_overrides, "train.epochs=1", "train.lr=0.000001"])
    out = tmp_path / "train"
    untrained = train(demo_dir, params, out, progress=False, validation=demo_validation)

    report = evaluate_model(untrained.model_dir, demo_dir, params, tmp_path / "evaluate")

    found = report.underfit
    assert found is not None
    assert report.classification.accuracy <= found.chance + found.margin
    assert [epoch["epoch"] for epoch in found.curve] == [1]
    assert "train.epochs" in found.hint and "pretrained" in found.hint
    assert json.loads((tmp_path / "evaluate" / METRICS_FILE).read_text())["underfit"]["curve"]
    markdown = (tmp_path / "evaluate" / REPORT_FILE).read_text()
    assert "## Underfit" in markdown and found.hint in markdown
    assert "| 1 | " in markdown


def test_flat_metrics_keys_are_legal_mlflow_names(
    evaluated: tuple[EvaluationReport, Path],
) -> None:
    metrics, _ = evaluated

    flat = flat_metrics(metrics)

    assert flat["accuracy"] == metrics.classification.accuracy
    assert flat["robustness.image_blur.drop"] == metrics.robustness["image_blur"].drop
    assert "confusion_matrix" not in " ".join(flat)
    assert [key for key in flat if not is_mlflow_key(key)] == []


def test_flat_metrics_replaces_characters_mlflow_rejects() -> None:
    metrics = {"per_class": {"t-shirt/top": {"f1": 0.5}, "a+b (c)": {"f1": 1}}, "ok": True}

    flat = flatten(metrics)

    assert flat == {"per_class.t-shirt/top.f1": 0.5, "per_class.a_b _c_.f1": 1.0}


def predictions(probs: list[list[float]], targets: list[int], dim: int = 4) -> Predictions:
    n = len(targets)
    return Predictions(
        probs=np.array(probs, dtype=float),
        targets=np.array(targets),
        image_embeds=np.eye(n, dim),
        text_embeds=np.eye(n, dim),
    )


def test_classification_metrics_of_perfect_predictions() -> None:
    pred = predictions([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8]], [0, 1, 1])

    metrics = classification_metrics(pred, ["a", "b"])

    assert metrics.accuracy == 1.0
    assert metrics.macro_f1 == 1.0
    assert metrics.confusion_matrix == [[1, 0], [0, 2]]
    assert metrics.per_class["b"] == ClassMetrics(precision=1.0, recall=1.0, f1=1.0, support=2)


def test_classification_metrics_known_answer() -> None:
    # targets a a b b, predicted a b b b
    pred = predictions([[1, 0], [0, 1], [0, 1], [0, 1]], [0, 0, 1, 1])

    metrics = classification_metrics(pred, ["a", "b"])

    assert metrics.accuracy == 0.75
    assert metrics.confusion_matrix == [[1, 1], [0, 2]]
    a, b = metrics.per_class["a"], metrics.per_class["b"]
    assert (a.precision, a.recall, a.f1) == pytest.approx((1.0, 0.5, 2 / 3))
    assert (b.precision, b.recall, b.f1) == pytest.approx((2 / 3, 1.0, 0.8))
    assert metrics.macro_f1 == pytest.approx((2 / 3 + 0.8) / 2)


def test_classification_metrics_count_unknown_labels_as_errors() -> None:
    # The third example's label was never seen in training (-1): wrong, but not in the matrix.
    pred = predictions([[1, 0, 0], [0, 1, 0], [0, 1, 0]], [0, 1, -1])

    metrics = classification_metrics(pred, ["a", "b", "c"])

    assert metrics.accuracy == pytest.approx(2 / 3)
    assert np.array(metrics.confusion_matrix).sum() == 2
    # Class c is neither a true nor a predicted label: reported with support 0, left out of the
    # macro average.
    assert metrics.per_class["c"].support == 0
    assert metrics.macro_f1 == 1.0


def test_macro_f1_averages_over_true_and_predicted_classes() -> None:
    # targets a a b b, predicted a c b b: c is predicted but never true, and counts with F1 0.
    pred = predictions([[1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 0]], [0, 0, 1, 1])

    metrics = classification_metrics(pred, ["a", "b", "c", "d"])

    assert metrics.macro_f1 == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    assert metrics.per_class["c"] == ClassMetrics(precision=0.0, recall=0.0, f1=0.0, support=0)
    assert set(metrics.per_class) == {"a", "b", "c", "d"}


def test_calibration_when_all_correct_is_one_minus_confidence() -> None:
    probs = [[0.6, 0.4], [0.3, 0.7], [0.95, 0.05], [0.1, 0.9]]
    pred = predictions(probs, [0, 1, 0, 1])

    result = calibration(pred, bins=10)

    confidence = np.mean([0.6, 0.7, 0.95, 0.9])
    assert result.ece == pytest.approx(1 - confidence)
    assert sum(b.count for b in result.curve) == 4
    assert all(b.accuracy == 1.0 for b in result.curve)


def test_calibration_of_confident_wrong_answers_is_one() -> None:
    pred = predictions([[1.0, 0.0], [0.0, 1.0]], [1, 0])

    result = calibration(pred, bins=15)

    assert result.ece == pytest.approx(1.0)
    assert result.curve == [CalibrationBin(bin=14, confidence=1.0, accuracy=0.0, count=2)]


def test_calibration_is_zero_when_confidence_matches_accuracy() -> None:
    # Two examples at confidence 0.5, one right and one wrong: perfectly calibrated.
    pred = predictions([[0.5, 0.5], [0.5, 0.5]], [0, 1])

    assert calibration(pred, bins=10).ece == pytest.approx(0.0)


def test_retrieval_recall_of_matching_embeddings_is_one() -> None:
    pred = predictions([[1.0]] * 4, [0] * 4)

    recall = retrieval_recall(pred, ks=(1, 2))

    assert recall == {
        "image_to_text_recall_at_1": 1.0,
        "image_to_text_recall_at_2": 1.0,
        "text_to_image_recall_at_1": 1.0,
        "text_to_image_recall_at_2": 1.0,
    }


def test_retrieval_recall_of_shifted_pairs() -> None:
    # Each text matches the next image best, its own image second best.
    images = np.eye(4)
    texts = 0.6 * np.roll(images, 1, axis=0) + 0.4 * images
    pred = Predictions(np.ones((4, 1)), np.zeros(4, dtype=int), images, texts)

    recall = retrieval_recall(pred, ks=(1, 2))

    assert recall["image_to_text_recall_at_1"] == 0.0
    assert recall["image_to_text_recall_at_2"] == 1.0
    assert recall["text_to_image_recall_at_1"] == 0.0
    assert recall["text_to_image_recall_at_2"] == 1.0
