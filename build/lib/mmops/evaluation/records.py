"""The evaluation report as typed records; `to_dict` gives the metrics.json that DVC tracks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class ClassMetrics:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class ClassificationMetrics:
    """Accuracy, macro-F1, per-class figures and the confusion matrix (rows true, columns
    predicted, in the model's label order)."""

    accuracy: float
    macro_f1: float
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Ablation:
    """Accuracy with both modalities, and with one of them withheld."""

    both: float
    image_only: float
    text_only: float


@dataclass(frozen=True)
class Perturbation:
    """Accuracy under one perturbation, and how far it fell from the clean test split."""

    accuracy: float
    drop: float


@dataclass(frozen=True)
class GroupMetrics:
    """Accuracy per group, the largest gap between groups, and bootstrap 95% intervals."""

    accuracy: dict[str, float]
    counts: dict[str, int]
    max_gap: float
    max_gap_ci95: tuple[float, float]
    accuracy_ci95: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        ci95 = {"max_gap_ci95": list(self.max_gap_ci95), "accuracy_ci95": list(self.accuracy_ci95)}
        return {**asdict(self), **ci95}


@dataclass(frozen=True)
class CalibrationBin:
    bin: int
    confidence: float
    accuracy: float
    count: int


@dataclass(frozen=True)
class Calibration:
    """Expected calibration error and the reliability curve (non-empty bins only)."""

    ece: float
    bins: int
    curve: list[CalibrationBin]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Efficiency:
    """Speed and size; `latency` maps a batch size to `measure_latency`'s figures."""

    device: str
    backend: str
    latency: dict[str, dict[str, float]]
    peak_memory_mb: float
    parameters: int
    model_size_mb: float


@dataclass(frozen=True)
class BaselineResult:
    """The classical baseline fitted on the train split, chosen on val, scored on test.

    `pipeline` is the fitted scikit-learn Pipeline (inputs from `baseline_inputs`); it stays
    out of the repr, comparisons and `to_dict`.
    """

    kind: str  # the candidate with the best val accuracy: "logistic" or "mlp"
    val_accuracy: float
    test_accuracy: float
    test_macro_f1: float
    candidates: dict[str, float]  # val accuracy of every candidate, by kind
    train_examples: int  # the rows it was fitted on (the train split, capped)
    n_features: int
    seconds: float
    pipeline: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        # Not asdict: it would deep-copy the fitted pipeline only to drop it.
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "pipeline"}
        return {**out, "candidates": dict(self.candidates)}


@dataclass(frozen=True)
class ZeroShotResult:
    """A dual encoder classifying the test split from label prompts alone: the floor a model
    trained from it must beat (mmops.evaluation.zero_shot)."""

    checkpoint: str
    test_accuracy: float
    test_macro_f1: float
    labels: int
    templates: tuple[str, ...]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "templates": list(self.templates)}


@dataclass(frozen=True)
class Underfit:
    """A model no better than always answering the test split's most common class."""

    accuracy: float
    chance: float  # the majority class's share of the test split
    margin: float  # how far above chance counts as learnt: max(0.02, 2 binomial std errors)
    hint: str
    # The training run's epochs (epoch, train/val loss and accuracy, lr); empty when the model
    # folder has no training history beside it.
    curve: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EvaluationReport:
    """Everything the evaluate stage measured on the test split."""

    test_examples: int
    classification: ClassificationMetrics
    ablation: Ablation
    # Keyed by perturbation: image_noise, image_blur, text_typos, missing_image, missing_text.
    robustness: dict[str, Perturbation]
    calibration: Calibration
    efficiency: Efficiency
    groups: GroupMetrics | None = None  # when the dataset has a `group` column
    retrieval: dict[str, float] | None = None  # when the model was trained contrastively
    baseline: BaselineResult | None = None  # the classical model on the same splits
    underfit: Underfit | None = None  # when the model is no better than chance
    zero_shot: ZeroShotResult | None = None  # the dual encoder's own, with model.pretrained

    def to_dict(self) -> dict[str, Any]:
        """metrics.json: the classification figures at the top level, then each section."""
        out: dict[str, Any] = {
            "test_examples": self.test_examples,
            **self.classification.to_dict(),
            "ablation": asdict(self.ablation),
            "robustness": {name: asdict(p) for name, p in self.robustness.items()},
        }
        if self.groups is not None:
            out["groups"] = self.groups.to_dict()
        out["calibration"] = self.calibration.to_dict()
        if self.retrieval is not None:
            out["retrieval"] = dict(self.retrieval)
        out["efficiency"] = asdict(self.efficiency)
        if self.baseline is not None:
            gain = self.classification.accuracy - self.baseline.test_accuracy
            out["baseline"] = {**self.baseline.to_dict(), "gain": gain}
        if self.underfit is not None:
            out["underfit"] = self.underfit.to_dict()
        if self.zero_shot is not None:
            gain = self.classification.accuracy - self.zero_shot.test_accuracy
            out["zero_shot"] = {**self.zero_shot.to_dict(), "gain": gain}
        return out
