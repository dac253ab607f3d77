"""The model's outputs on a dataset, through the serving path."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import accuracy_score
from torch.utils.data import DataLoader

from mmops.model.preprocess import MultimodalDataset
from mmops.serving.predictor import Predictor
from mmops.serving.runners import run_loader


@dataclass(frozen=True)
class Predictions:
    probs: np.ndarray  # (n, classes)
    targets: np.ndarray  # label index, -1 for a label the model never saw
    image_embeds: np.ndarray
    text_embeds: np.ndarray

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def accuracy(self) -> float:
        """Share right; an example whose label the model never saw is always wrong."""
        if not len(self.targets):
            return 0.0
        return float(accuracy_score(self.targets, self.predicted))


def predict_dataset(
    predictor: Predictor, dataset: MultimodalDataset, batch_size: int
) -> Predictions:
    """Class probabilities and embeddings for every example, in order, on the serving path."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=predictor.collate)
    targets: list[np.ndarray] = []

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for batch in loader:
            targets.append(batch["labels"])
            yield batch

    outputs = run_loader(predictor.runner, batches(), len(predictor.labels))
    target = np.concatenate(targets) if targets else np.zeros(0, dtype=int)
    return Predictions(outputs.probs, target, outputs.embeds["image"], outputs.embeds["text"])
