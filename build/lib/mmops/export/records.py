"""The export report as typed records; `to_dict` gives the export.json that picks what serves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RecallChange:
    """One class's recall on the torch model and on the candidate."""

    torch: float
    candidate: float


@dataclass(frozen=True)
class ParityResult:
    """Whether `candidate` ("fp32" or "int8") may replace the torch model; `reasons` says why
    not."""

    candidate: str
    passed: bool
    reasons: list[str]
    agreement: float
    accuracy_drop: float
    max_score_diff: float
    recall: dict[str, RecallChange]  # classes with test examples

    def to_dict(self) -> dict[str, Any]:
        """As in export.json, where the candidate is named by the key it sits under."""
        return {
            "passed": self.passed,
            "reasons": list(self.reasons),
            "agreement": self.agreement,
            "accuracy_drop": self.accuracy_drop,
            "max_score_diff": self.max_score_diff,
            "recall": {
                label: {"torch": r.torch, self.candidate: r.candidate}
                for label, r in self.recall.items()
            },
        }


@dataclass(frozen=True)
class Gates:
    """The parity verdict of each ONNX model."""

    fp32: ParityResult
    int8: ParityResult

    def all(self) -> tuple[ParityResult, ParityResult]:
        return self.fp32, self.int8

    def serving(self) -> str:
        """What serves: INT8 if it passed, else FP32 ONNX if it passed, else torch."""
        return "int8" if self.int8.passed else "fp32" if self.fp32.passed else "torch"


@dataclass(frozen=True)
class ExportReport:
    """The export stage's verdict and figures. Accuracy, size and latency are keyed by backend
    (torch, fp32, int8); latency then by batch size, as `measure_latency` reports it."""

    serving: str
    attention: str  # "fused" or "plain": how attention went into the ONNX graph
    gates: Gates
    accuracy: dict[str, float]
    size_bytes: dict[str, int]
    latency: dict[str, dict[str, dict[str, float]]]
    test_examples: int

    @property
    def size_ratio_int8_vs_fp32(self) -> float:
        return self.size_bytes["int8"] / self.size_bytes["fp32"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "serving": self.serving,
            "attention": self.attention,
            "gates": {gate.candidate: gate.to_dict() for gate in self.gates.all()},
            "accuracy": dict(self.accuracy),
            "size_bytes": dict(self.size_bytes),
            "latency": self.latency,
            "test_examples": self.test_examples,
            "size_ratio_int8_vs_fp32": self.size_ratio_int8_vs_fp32,
        }


def export_metrics(report: ExportReport) -> dict[str, float]:
    """The export report as flat numbers, for MLflow and `dvc metrics`."""
    flat: dict[str, float] = {
        f"export.accuracy.{name}": value for name, value in report.accuracy.items()
    }
    flat.update({f"export.size_bytes.{k}": v for k, v in report.size_bytes.items()})
    flat["export.size_ratio_int8_vs_fp32"] = report.size_ratio_int8_vs_fp32
    for gate in report.gates.all():
        flat[f"export.{gate.candidate}.passed"] = float(gate.passed)
        flat[f"export.{gate.candidate}.agreement"] = gate.agreement
        flat[f"export.{gate.candidate}.accuracy_drop"] = gate.accuracy_drop
    for name, by_size in report.latency.items():
        for size, figures in by_size.items():
            flat[f"export.latency.{name}.bs{size}.p50_ms"] = figures["p50_ms"]
    return flat
