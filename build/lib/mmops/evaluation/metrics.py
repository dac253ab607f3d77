"""Figures computed from predictions: classification, groups, calibration, retrieval."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from mmops.evaluation.predictions import Predictions
from mmops.evaluation.records import (
    Calibration,
    CalibrationBin,
    ClassificationMetrics,
    ClassMetrics,
    EvaluationReport,
    GroupMetrics,
)


def classification_metrics(pred: Predictions, labels: list[str]) -> ClassificationMetrics:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    An example whose label the model never saw (target -1) has no class to score: it counts
    against accuracy only. Macro-F1 averages over the classes among the true and predicted
    labels (scikit-learn's definition); per-class figures cover every label of the model.
    """
    known = pred.targets >= 0
    y_true, y_pred = pred.targets[known], pred.predicted[known]
    classes = list(range(len(labels)))
    matrix = confusion_matrix(y_true, y_pred, labels=classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0
    )
    macro_f1 = (
        float(f1_score(y_true, y_pred, average="macro", zero_division=0)) if known.any() else 0.0
    )
    return ClassificationMetrics(
        accuracy=pred.accuracy,
        macro_f1=macro_f1,
        per_class={
            label: ClassMetrics(
                float(precision[i]), float(recall[i]), float(f1[i]), int(support[i])
            )
            for i, label in enumerate(labels)
        },
        confusion_matrix=matrix.tolist(),
    )


def group_metrics(
    pred: Predictions, groups: pd.Series, samples: int, rng: np.random.Generator
) -> GroupMetrics:
    """Accuracy per group, the largest gap between groups, and bootstrap 95% intervals."""
    correct = pred.predicted == pred.targets
    names = sorted(str(g) for g in groups.dropna().unique())
    index = {name: np.flatnonzero(groups.astype(str).to_numpy() == name) for name in names}
    per_group = {name: float(correct[idx].mean()) for name, idx in index.items()}
    gap = max(per_group.values()) - min(per_group.values()) if per_group else 0.0
    # Hand-written: scipy.stats.bootstrap takes one statistic per call, and here the gap and the
    # pooled accuracy come from the same seeded replicates. Resampling within each group keeps
    # every replicate's group sizes.
    gaps, overall = [], []
    for _ in range(samples):
        accs = [correct[rng.choice(idx, len(idx))].mean() for idx in index.values()]
        gaps.append(max(accs) - min(accs))
        overall.append(correct[rng.integers(0, len(correct), len(correct))].mean())
    return GroupMetrics(
        accuracy=per_group,
        counts={name: len(idx) for name, idx in index.items()},
        max_gap=gap,
        max_gap_ci95=(float(np.percentile(gaps, 2.5)), float(np.percentile(gaps, 97.5))),
        accuracy_ci95=(float(np.percentile(overall, 2.5)), float(np.percentile(overall, 97.5))),
    )


def calibration(pred: Predictions, bins: int) -> Calibration:
    """Expected calibration error and the reliability curve (confidence vs accuracy per bin)."""
    # Hand-written: sklearn's calibration_curve returns neither bin indices nor counts, which
    # the ECE weights and calibration.csv need.
    confidence = pred.probs.max(axis=1)
    correct = pred.predicted == pred.targets
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    curve, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if not mask.any():
            continue
        conf, acc = float(confidence[mask].mean()), float(correct[mask].mean())
        ece += mask.mean() * abs(conf - acc)
        curve.append(CalibrationBin(b, conf, acc, int(mask.sum())))
    return Calibration(ece=float(ece), bins=bins, curve=curve)


def retrieval_recall(pred: Predictions, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k, each example's own pair being the match."""
    # Hand-written: sklearn's top_k_accuracy_score breaks ties by index order and treats two
    # candidates as a binary problem; here a tie with the true pair counts as found.
    similarity = pred.image_embeds @ pred.text_embeds.T
    n = len(similarity)
    own = np.arange(n)
    out = {}
    for direction, sims in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        # Rank of the true pair: how many candidates score strictly higher.
        rank = (sims > sims[own, own][:, None]).sum(axis=1)
        for k in ks:
            out[f"{direction}_recall_at_{k}"] = float((rank < k).mean()) if n else 0.0
    return out


def flat_metrics(report: EvaluationReport) -> dict[str, float]:
    """Numbers only, dotted keys: for dvc metrics and MLflow."""
    values = report.to_dict()
    del values["confusion_matrix"]
    return flatten(values)


def flatten(values: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of nested mappings under dotted keys that MLflow accepts; booleans dropped."""
    flat: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            # MLflow keys allow letters, digits and _ - . / and spaces; labels may hold more.
            flat[re.sub(r"[^\w\-./ ]", "_", prefix)] = float(value)

    walk("", values)
    return flat
