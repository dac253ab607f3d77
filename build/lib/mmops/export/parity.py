"""The parity gate: may an ONNX model replace the torch model on the test split?"""

from __future__ import annotations

import numpy as np

from mmops.config import ExportConfig
from mmops.export.records import ParityResult, RecallChange
from mmops.serving.runners import Outputs

# Tolerances are inclusive: a drop of exactly max_recall_drop (one example of twenty) passes,
# whatever the float rounding of 0.75 - 0.70.
_EPS = 1e-9


def parity(
    reference: Outputs,
    candidate: Outputs,
    targets: np.ndarray,
    labels: list[str],
    cfg: ExportConfig,
    name: str,
) -> ParityResult:
    """Whether `candidate` (named `name`) may replace the torch model; `reasons` says why not."""
    ref, cand = reference.probs.argmax(1), candidate.probs.argmax(1)
    agreement = float((ref == cand).mean())
    accuracy_drop = float((ref == targets).mean() - (cand == targets).mean())
    max_diff = float(np.abs(reference.probs - candidate.probs).max())
    recall = {}
    for i, label in enumerate(labels):
        rows = targets == i
        if rows.any():
            recall[label] = RecallChange(
                torch=float((ref[rows] == i).mean()), candidate=float((cand[rows] == i).mean())
            )
    reasons = []
    if accuracy_drop > cfg.max_accuracy_drop + _EPS:
        reasons.append(
            f"accuracy is {accuracy_drop * 100:.2f} points below torch's "
            f"(export.max_accuracy_drop {cfg.max_accuracy_drop})"
        )
    if agreement < cfg.min_agreement - _EPS:
        reasons.append(
            f"agrees with torch on {agreement:.4f} of the test split "
            f"(export.min_agreement {cfg.min_agreement})"
        )
    for label, r in recall.items():
        if r.torch - r.candidate > cfg.max_recall_drop + _EPS:
            reasons.append(
                f"recall of {label!r} fell from {r.torch:.3f} to {r.candidate:.3f} "
                f"(export.max_recall_drop {cfg.max_recall_drop})"
            )
    if name == "fp32" and max_diff > cfg.fp32_tolerance:
        reasons.append(
            f"class scores differ from torch by up to {max_diff:.2e} "
            f"(export.fp32_tolerance {cfg.fp32_tolerance})"
        )
    return ParityResult(
        candidate=name,
        passed=not reasons,
        reasons=reasons,
        agreement=agreement,
        accuracy_drop=accuracy_drop,
        max_score_diff=max_diff,
        recall=recall,
    )
