"""Typed records of a training run: its progress epoch by epoch, and its result."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    """Where per-epoch metrics go (MLflow in the CLI; nothing on a bare GPU machine)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


@dataclass
class TrainProgress:
    """Where a run stands after its last finished epoch; the checkpoint keeps it for a resume."""

    epoch: int = 0
    best_val_accuracy: float = -1.0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    # Val accuracy a model must pass before early stopping counts: see `chance_floor`.
    floor: float = 0.0

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainProgress:
        return cls(**saved)

    def record(self, metrics: dict[str, float]) -> bool:
        """Add the next epoch's metrics; True when its model is the best so far."""
        self.epoch += 1
        self.history.append({"epoch": self.epoch, **metrics})
        accuracy, loss = metrics["val_accuracy"], metrics["val_loss"]
        # Ties in accuracy, common on small val sets, go to the lower loss.
        improved = accuracy > self.best_val_accuracy or (
            accuracy == self.best_val_accuracy and loss < self.best_val_loss
        )
        if improved:
            self.best_val_accuracy, self.best_val_loss = accuracy, loss
            self.best_epoch, self.bad_epochs = self.epoch, 0
        elif self.best_val_accuracy > self.floor:
            # Patience runs only once the model has learned something: a model at chance is
            # on a plateau it usually leaves (measured: for 2 to 9 epochs when the label needs
            # both modalities), and stopping there ends the run with nothing.
            self.bad_epochs += 1
        return improved

    def out_of_patience(self, patience: int) -> bool:
        """Whether early stopping (off when `patience` is 0) has run out of epochs to wait."""
        return bool(patience) and self.bad_epochs >= patience


def chance_floor(labels: list[int]) -> float:
    """The val accuracy of always guessing the commonest class, plus two standard errors."""
    if not labels:
        return 0.0
    share = max(labels.count(label) for label in set(labels)) / len(labels)
    return share + chance_noise(share, len(labels))


def chance_noise(share: float, n: int) -> float:
    """Two binomial standard errors of an accuracy of `share` on `n` examples: what luck adds."""
    return 2 * math.sqrt(share * (1 - share) / n)


@dataclass
class TrainResult:
    model_dir: Path
    labels: list[str]
    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    stopped_early: bool
    device: str
    world_size: int
    parameters: int
    history: list[dict[str, float]] = field(default_factory=list)
    # How the data was admitted (mmops.training.validation_gate.DataValidation.to_dict()).
    validation: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model_dir": str(self.model_dir)}
