"""Evaluation on the test split: quality, ablation, robustness, slices, calibration, speed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from mmops.config import EvaluateConfig, Params
from mmops.data.dataset import load_splits, split_rows
from mmops.evaluation.baseline import fit_baseline, training_curve, underfit
from mmops.evaluation.efficiency import efficiency
from mmops.evaluation.metrics import (
    calibration,
    classification_metrics,
    group_metrics,
    retrieval_recall,
)
from mmops.evaluation.perturb import blur, gaussian_noise, typos
from mmops.evaluation.predictions import Predictions, predict_dataset
from mmops.evaluation.records import (
    Ablation,
    EvaluationReport,
    Perturbation,
    Underfit,
    ZeroShotResult,
)
from mmops.evaluation.report import write_evaluation
from mmops.evaluation.zero_shot import build_zero_shot, dataset_labels, zero_shot_floor
from mmops.model.preprocess import ImageTransform, MultimodalDataset, TextTransform
from mmops.serving.predictor import Predictor

ZERO_SHOT_MODEL = "model"  # the zero-shot model's folder in its evaluation's


def evaluate_model(
    model_dir: Path | str,
    data_dir: Path | str,
    params: Params,
    out_dir: Path | str | None = None,
    backend: str = "torch",
) -> EvaluationReport:
    """Evaluate a saved model on the test split; write metrics.json, report.md, plots and data.

    Beside it, the classical baseline fitted on the same splits and, with a dual encoder in
    `model.pretrained`, its zero-shot accuracy; a model no better than the majority class is
    reported as underfit, with its training curve. `backend` picks what runs: the torch model
    by default, or an exported ONNX model."""
    cfg = params.evaluate
    out = Path(out_dir or cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(model_dir, backend, params.predict)
    labels = predictor.labels
    test = split_rows(load_splits(data_dir, params), "test", data_dir, needed_by="evaluation")
    label_index = {label: i for i, label in enumerate(labels)}
    spec = predictor.image_spec

    def run(
        rows: pd.DataFrame = test,
        image_transform: ImageTransform | None = None,
        text_transform: TextTransform | None = None,
    ) -> Predictions:
        dataset = MultimodalDataset(
            data_dir, rows, label_index, spec, image_transform, text_transform
        )
        return predict_dataset(predictor, dataset, cfg.batch_size)

    base = run()
    rng = np.random.default_rng(cfg.seed)
    quality = classification_metrics(base, labels)
    ablation, robustness = _ablation_and_robustness(run, test, cfg, rng, quality.accuracy)
    report = EvaluationReport(
        test_examples=len(test),
        classification=quality,
        ablation=ablation,
        robustness=robustness,
        groups=(
            group_metrics(base, test["group"], cfg.bootstrap_samples, rng)
            if "group" in test
            else None
        ),
        calibration=calibration(base, cfg.calibration_bins),
        retrieval=retrieval_recall(base) if predictor.meta.get("contrastive") else None,
        efficiency=efficiency(
            predictor,
            MultimodalDataset(data_dir, test, label_index, spec),
            cfg.latency_batch_sizes,
            cfg.latency_repeats,
        ),
        baseline=fit_baseline(data_dir, params),
        underfit=_underfit(model_dir, test, quality.accuracy),
        zero_shot=_zero_shot_floor(predictor, data_dir, params),
    )
    write_evaluation(out, report, labels, test, base)
    return report


def evaluate_zero_shot(
    data_dir: Path | str, checkpoint: str, params: Params, out_dir: Path | str | None = None
) -> EvaluationReport:
    """Save the zero-shot classifier of the dual encoder `checkpoint` over the dataset's labels
    to `out_dir`/model (ZERO_SHOT_MODEL) and evaluate it there like any model."""
    out = Path(out_dir or params.zero_shot.out_dir)
    labels = dataset_labels(load_splits(data_dir, params))
    model_dir = build_zero_shot(
        checkpoint, labels, params, out / ZERO_SHOT_MODEL, key="zero-shot checkpoint"
    )
    return evaluate_model(model_dir, data_dir, params, out)


def _zero_shot_floor(
    predictor: Predictor, data_dir: Path | str, params: Params
) -> ZeroShotResult | None:
    # A zero-shot model is that floor itself.
    if predictor.model_config.fusion == "zero_shot":
        return None
    return zero_shot_floor(data_dir, params)


def _underfit(model_dir: Path | str, test: pd.DataFrame, accuracy: float) -> Underfit | None:
    counts = test["label"].astype(str).value_counts().to_dict()
    return underfit(accuracy, counts, training_curve(model_dir))


def _ablation_and_robustness(
    run: Callable[..., Predictions],
    test: pd.DataFrame,
    cfg: EvaluateConfig,
    rng: np.random.Generator,
    accuracy: float,
) -> tuple[Ablation, dict[str, Perturbation]]:
    """Each modality withheld, and each perturbation, with the accuracy drop it costs."""
    image_only = run(test.assign(text=None)).accuracy
    text_only = run(test.assign(image=None)).accuracy
    # The rng is drawn in this order (noise, then typos): the seeded figures depend on it.
    perturbed = {
        "image_noise": run(image_transform=gaussian_noise(cfg.noise_std, rng)).accuracy,
        "image_blur": run(image_transform=blur(cfg.blur_radius)).accuracy,
        "text_typos": run(text_transform=typos(cfg.typo_rate, rng)).accuracy,
        # A missing modality is the ablation seen from the other side: same runs, named for both.
        "missing_image": text_only,
        "missing_text": image_only,
    }
    robustness = {name: Perturbation(acc, accuracy - acc) for name, acc in perturbed.items()}
    return Ablation(both=accuracy, image_only=image_only, text_only=text_only), robustness
