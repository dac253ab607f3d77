"""The evaluate stage's files: metrics.json, report.md, plots as images and as data, predictions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd

from mmops.evaluation.predictions import Predictions
from mmops.evaluation.records import (
    BaselineResult,
    Calibration,
    ClassificationMetrics,
    EvaluationReport,
    Underfit,
    ZeroShotResult,
)

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PREDICTIONS_FILE = "predictions.jsonl"
# Plots as data, for `dvc plots diff`: one row per test example (dvc's confusion template),
# and the reliability curve.
CONFUSION_CSV = "confusion.csv"
CALIBRATION_CSV = "calibration.csv"


def write_evaluation(
    out: Path, report: EvaluationReport, labels: list[str], rows: pd.DataFrame, pred: Predictions
) -> None:
    """Every file of the evaluation folder `out`."""
    matrix = report.classification.confusion_matrix
    plot_confusion(matrix, labels, out / "confusion_matrix.png")
    plot_reliability(report.calibration, out / "reliability.png")
    write_confusion_csv(rows["label"], pred, labels, out / CONFUSION_CSV)
    write_calibration_csv(report.calibration, out / CALIBRATION_CSV)
    (out / METRICS_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (out / REPORT_FILE).write_text(render_report(report, labels))
    write_predictions(rows, pred, labels, out / PREDICTIONS_FILE)


def write_confusion_csv(
    actual: pd.Series, pred: Predictions, labels: list[str], path: Path
) -> None:
    """actual,predicted per example, by label name (a label the model never saw included)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        for truth, index in zip(actual, pred.predicted, strict=True):
            writer.writerow([truth, labels[int(index)]])


def write_calibration_csv(calib: Calibration, path: Path) -> None:
    """bin,confidence,accuracy,count per non-empty bin of the reliability curve."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["bin", "confidence", "accuracy", "count"])
        for b in calib.curve:
            writer.writerow([b.bin, b.confidence, b.accuracy, b.count])


def write_predictions(rows: pd.DataFrame, pred: Predictions, labels: list[str], path: Path) -> None:
    """One JSON line per example: its id, the predicted label and every label's score."""
    with path.open("w") as f:
        for example_id, probs in zip(rows["id"], pred.probs, strict=True):
            scores = {label: round(float(p), 6) for label, p in zip(labels, probs, strict=True)}
            record = {"id": example_id, "label": labels[int(probs.argmax())], "scores": scores}
            f.write(json.dumps(record) + "\n")


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(labels), 1 + 0.5 * len(labels)))
    data = np.array(matrix)
    ax.imshow(data, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), value in np.ndenumerate(data):
        color = "white" if value > data.max() / 2 else "black"
        ax.text(j, i, str(value), ha="center", va="center", color=color, fontsize=8)
    ax.set_title("Confusion matrix (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(calib: Calibration, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    confidence = [b.confidence for b in calib.curve]
    ax.plot(confidence, [b.accuracy for b in calib.curve], "o-", label="model")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {calib.ece:.3f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_report(report: EvaluationReport, labels: list[str]) -> str:
    """report.md: quality, underfit, baseline, zero-shot, ablation, robustness, groups,
    calibration, retrieval, efficiency."""
    lines = [
        *_quality_section(report, labels),
        *underfit_section(report.underfit),
        *baseline_section(report.baseline, report.classification),
        *zero_shot_section(report.zero_shot, report.classification),
        *_robustness_section(report),
        *_groups_section(report),
        *_calibration_section(report),
        *_retrieval_section(report),
        *_efficiency_section(report),
    ]
    return "\n".join(lines) + "\n"


def _quality_section(report: EvaluationReport, labels: list[str]) -> list[str]:
    quality = report.classification
    lines = [
        "# Evaluation report",
        "",
        f"Test examples: {report.test_examples}. "
        f"**Accuracy {quality.accuracy:.4f}**, macro-F1 {quality.macro_f1:.4f}.",
        "",
        "## Per class",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for label in labels:
        c = quality.per_class[label]
        lines.append(f"| {label} | {c.precision:.3f} | {c.recall:.3f} | {c.f1:.3f} | {c.support} |")
    return [*lines, "", "![confusion matrix](confusion_matrix.png)"]


def underfit_section(underfit: Underfit | None) -> list[str]:
    """The warning for a model near chance, its hint and training curve (none when it learnt)."""
    if underfit is None:
        return []
    lines = [
        "",
        "## Underfit",
        "",
        f"**Accuracy {underfit.accuracy:.4f} is not clearly above chance**: the most common "
        f"class is {underfit.chance:.4f} of the test split, and only a model above "
        f"{underfit.chance + underfit.margin:.4f} (chance + {underfit.margin:.4f}) has learnt "
        "something.",
        "",
        underfit.hint,
    ]
    if not underfit.curve:
        return [*lines, "", "No training curve: the model folder has no history beside it."]
    lines += [
        "",
        "| epoch | train loss | train accuracy | val loss | val accuracy |",
        "|---|---|---|---|---|",
    ]
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
    for epoch in underfit.curve:
        cells = " | ".join(f"{epoch[k]:.4f}" if k in epoch else "-" for k in keys)
        lines.append(f"| {int(epoch.get('epoch', 0))} | {cells} |")
    return lines


def baseline_section(baseline: BaselineResult | None, quality: ClassificationMetrics) -> list[str]:
    """The classical baseline on the same test split, and the model's gain over it."""
    if baseline is None:
        return []
    candidates = ", ".join(f"{k} {v:.4f}" for k, v in baseline.candidates.items())
    return [
        "",
        "## Baseline",
        "",
        "| model | test accuracy | test macro-F1 |",
        "|---|---|---|",
        f"| this model | {quality.accuracy:.4f} | {quality.macro_f1:.4f} |",
        f"| baseline ({baseline.kind}) | {baseline.test_accuracy:.4f} | "
        f"{baseline.test_macro_f1:.4f} |",
        "",
        f"Gain over the baseline: **{quality.accuracy - baseline.test_accuracy:+.4f}**. "
        "The baseline is scikit-learn on downsampled pixels and a bag of words, fitted on "
        f"{baseline.train_examples} train examples ({baseline.n_features} features) in "
        f"{baseline.seconds:.1f} s and chosen on val accuracy ({candidates}).",
    ]


def zero_shot_section(
    zero_shot: ZeroShotResult | None, quality: ClassificationMetrics
) -> list[str]:
    """The dual encoder's own zero-shot accuracy on the same test split, and the gain over it."""
    if zero_shot is None:
        return []
    templates = ", ".join(f"`{t}`" for t in zero_shot.templates)
    return [
        "",
        "## Zero-shot",
        "",
        "| model | test accuracy | test macro-F1 |",
        "|---|---|---|",
        f"| this model | {quality.accuracy:.4f} | {quality.macro_f1:.4f} |",
        f"| zero-shot | {zero_shot.test_accuracy:.4f} | {zero_shot.test_macro_f1:.4f} |",
        "",
        f"Gain over zero-shot: **{quality.accuracy - zero_shot.test_accuracy:+.4f}**. Zero-shot "
        f"is `{zero_shot.checkpoint}` matching each image with prompts for its "
        f"{zero_shot.labels} labels ({templates}), in {zero_shot.seconds:.1f} s.",
    ]


def _robustness_section(report: EvaluationReport) -> list[str]:
    ablation = report.ablation
    lines = ["", "## Modality ablation", "", "| inputs | accuracy |", "|---|---|"]
    lines += [
        f"| both | {ablation.both:.4f} |",
        f"| image_only | {ablation.image_only:.4f} |",
        f"| text_only | {ablation.text_only:.4f} |",
    ]
    lines += ["", "## Robustness", "", "| perturbation | accuracy | drop |", "|---|---|---|"]
    lines += [
        f"| {name} | {p.accuracy:.4f} | {p.drop:+.4f} |" for name, p in report.robustness.items()
    ]
    return lines


def _groups_section(report: EvaluationReport) -> list[str]:
    g = report.groups
    if g is None:
        return []
    lines = ["", "## Groups", "", "| group | examples | accuracy |", "|---|---|---|"]
    lines += [f"| {k} | {g.counts[k]} | {v:.4f} |" for k, v in g.accuracy.items()]
    lo, hi = g.max_gap_ci95
    return [*lines, "", f"Largest gap {g.max_gap:.4f} (bootstrap 95% CI {lo:.4f} to {hi:.4f})."]


def _calibration_section(report: EvaluationReport) -> list[str]:
    cal = report.calibration
    return [
        "",
        "## Calibration",
        "",
        f"ECE {cal.ece:.4f} over {cal.bins} bins.",
        "",
        "![reliability diagram](reliability.png)",
    ]


def _retrieval_section(report: EvaluationReport) -> list[str]:
    if report.retrieval is None:
        return []
    lines = ["", "## Retrieval", "", "| metric | value |", "|---|---|"]
    return lines + [f"| {k} | {v:.4f} |" for k, v in report.retrieval.items()]


def _efficiency_section(report: EvaluationReport) -> list[str]:
    e = report.efficiency
    lines = [
        "",
        "## Efficiency",
        "",
        f"Device {e.device}, {e.parameters:,} parameters, "
        f"{e.model_size_mb:.2f} MiB of weights, peak memory {e.peak_memory_mb:.0f} MiB.",
        "",
        "| batch | p50 ms | p95 ms | examples/s |",
        "|---|---|---|---|",
    ]
    return lines + [
        f"| {bs} | {v['p50_ms']:.2f} | {v['p95_ms']:.2f} | {v['throughput_per_s']:.0f} |"
        for bs, v in e.latency.items()
    ]
