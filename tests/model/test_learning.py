"""The default model learns what it was never tuned on: a label that needs both modalities."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from sklearn.linear_model import LogisticRegression

from mmops.config import Params, load_params
from mmops.evaluation.evaluate import evaluate_model
from mmops.training.train import train
from mmops.training.validation_gate import DataValidation

COLOURS = [(220, 40, 40), (40, 170, 60), (50, 80, 220), (230, 200, 30)]
NUMBERS = ["zero", "one", "two", "three"]
WORDINGS = ["shift the colour by {k}", "add {k} to it", "what is this plus {k}?", "{k} steps on"]


def write_compositional(root: Path, n: int, seed: int) -> list[tuple[int, int, int]]:
    """Label = (colour index + k) mod 4: the colour is in the image, k in the text."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows, latents = [], []
    for i in range(n):
        colour, k = int(rng.integers(4)), int(rng.integers(4))
        image = Image.fromarray(rng.integers(90, 160, (32, 32, 3), dtype=np.uint8))
        x, y, size = *rng.integers(2, 16, 2), int(rng.integers(8, 15))
        ImageDraw.Draw(image).ellipse([x, y, x + size, y + size], fill=COLOURS[colour])
        image.save(root / "images" / f"{i}.png")
        text = str(rng.choice(WORDINGS)).format(k=NUMBERS[k])
        label = NUMBERS[(colour + k) % 4]
        rows.append({"id": str(i), "image": f"images/{i}.png", "text": text, "label": label})
        latents.append((colour, k, (colour + k) % 4))
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return latents


def test_neither_modality_alone_predicts_the_toy_label(tmp_path: Path) -> None:
    latents = np.array(write_compositional(tmp_path / "toy", 800, seed=1))
    colour, k, label = latents[:, :1], latents[:, 1:2], latents[:, 2]

    for feature in (colour, k):
        probe = LogisticRegression().fit(np.eye(4)[feature[:600, 0]], label[:600])
        assert probe.score(np.eye(4)[feature[600:, 0]], label[600:]) < 0.4  # chance is 0.25


@pytest.mark.slow
def test_default_model_learns_a_label_that_needs_both_modalities(
    tmp_path: Path,
    small_overrides: tuple[str, ...],
    validated: Callable[[Path, Params], DataValidation],
) -> None:
    data = tmp_path / "toy"
    write_compositional(data, 800, seed=0)
    params = load_params(
        "params.yaml",
        [
            *small_overrides,
            "model.image_size=32",
            "train.epochs=8",
            "train.min_steps=0",
            "train.num_workers=0",
            "evaluate.bootstrap_samples=20",
            "evaluate.latency_repeats=2",
        ],
    )

    validation = validated(data, params)
    result = train(data, params, tmp_path / "train", progress=False, validation=validation)
    report = evaluate_model(result.model_dir, data, params, tmp_path / "evaluate")

    assert report.classification.accuracy > 0.9
    assert report.ablation.image_only < 0.5
    assert report.ablation.text_only < 0.5
