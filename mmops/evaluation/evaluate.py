"""Evaluation on the test split: quality, ablation, robustness, slices, calibration, speed."""

from __future__ import annotations

import json
import logging
import re
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader

from mmops.config import Params
from mmops.data.dataset import load_splits, split_rows
from mmops.model.classifier import count_parameters
from mmops.model.preprocess import ImageTransform, MultimodalDataset, TextTransform
from mmops.model.storage import WEIGHTS_FILE
from mmops.serving.predictor import Predictor
from mmops.serving.runners import cycled_batch, measure_latency, run_loader

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"


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
        return float((self.predicted == self.targets).mean()) if len(self.targets) else 0.0


def predict_dataset(
    predictor: Predictor, dataset: MultimodalDataset, batch_size: int
) -> Predictions:
    """Class probabilities and embeddings for every example, in order, on the serving path."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=predictor.collate)
    targets: list[torch.Tensor] = []

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for batch in loader:
            targets.append(batch["labels"])
            yield batch

    outputs = run_loader(predictor.runner, batches(), len(predictor.labels))
    target = torch.cat(targets).numpy() if targets else np.zeros(0, dtype=int)
    return Predictions(outputs.probs, target, outputs.image_embeds, outputs.text_embeds)


def evaluate_model(
    model_dir: Path | str,
    data_dir: Path | str,
    params: Params,
    out_dir: Path | str | None = None,
    backend: str = "torch",
) -> dict[str, Any]:
    """Evaluate a saved model on the test split; write metrics.json, report.md and plots.

    `backend` picks what runs: the torch model by default, or an exported ONNX model.
    """
    cfg = params.evaluate
    out = Path(out_dir or cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(model_dir, backend, params.predict)
    loaded = predictor.loaded
    frame = load_splits(data_dir, params)
    test = split_rows(frame, "test", data_dir, needed_by="evaluation")
    label_index = {label: i for i, label in enumerate(loaded.labels)}
    size = loaded.model.config.image_size

    def run(
        rows: pd.DataFrame = test,
        image_transform: ImageTransform | None = None,
        text_transform: TextTransform | None = None,
    ) -> Predictions:
        dataset = MultimodalDataset(
            data_dir, rows, label_index, size, image_transform, text_transform
        )
        return predict_dataset(predictor, dataset, cfg.batch_size)

    base = run()
    rng = np.random.default_rng(cfg.seed)
    metrics: dict[str, Any] = {
        "test_examples": len(test),
        **classification_metrics(base, loaded.labels),
    }
    variants = {
        "image_only": run(test.assign(text=None)),
        "text_only": run(test.assign(image=None)),
        "image_noise": run(image_transform=gaussian_noise(cfg.noise_std, rng)),
        "image_blur": run(image_transform=blur(cfg.blur_radius)),
        "text_typos": run(text_transform=typos(cfg.typo_rate, rng)),
    }
    metrics["ablation"] = {
        "both": base.accuracy,
        "image_only": variants["image_only"].accuracy,
        "text_only": variants["text_only"].accuracy,
    }
    # A missing modality is the ablation seen from the other side: same runs, named for both.
    robustness = {
        "image_noise": variants["image_noise"],
        "image_blur": variants["image_blur"],
        "text_typos": variants["text_typos"],
        "missing_image": variants["text_only"],
        "missing_text": variants["image_only"],
    }
    metrics["robustness"] = {
        name: {"accuracy": p.accuracy, "drop": base.accuracy - p.accuracy}
        for name, p in robustness.items()
    }
    if "group" in test:
        metrics["groups"] = group_metrics(base, test["group"], cfg.bootstrap_samples, rng)
    metrics["calibration"] = calibration(base, cfg.calibration_bins)
    if loaded.meta.get("contrastive"):
        metrics["retrieval"] = retrieval_recall(base)
    metrics["efficiency"] = efficiency(
        predictor,
        MultimodalDataset(data_dir, test, label_index, size),
        cfg.latency_batch_sizes,
        cfg.latency_repeats,
    )
    plot_confusion(metrics["confusion_matrix"], loaded.labels, out / "confusion_matrix.png")
    plot_reliability(metrics["calibration"], out / "reliability.png")
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    (out / REPORT_FILE).write_text(render_report(metrics, loaded.labels))
    _write_predictions(test, base, loaded.labels, out / "predictions.jsonl")
    return metrics


def classification_metrics(pred: Predictions, labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    k = len(labels)
    known = pred.targets >= 0
    matrix = np.zeros((k, k), dtype=int)
    np.add.at(matrix, (pred.targets[known], pred.predicted[known]), 1)
    tp = np.diag(matrix).astype(float)
    precision = np.divide(tp, matrix.sum(0), out=np.zeros(k), where=matrix.sum(0) > 0)
    recall = np.divide(tp, matrix.sum(1), out=np.zeros(k), where=matrix.sum(1) > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    present = matrix.sum(1) > 0
    return {
        "accuracy": pred.accuracy,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(matrix[i].sum()),
            }
            for i, label in enumerate(labels)
        },
        "confusion_matrix": matrix.tolist(),
    }


def group_metrics(
    pred: Predictions, groups: pd.Series, samples: int, rng: np.random.Generator
) -> dict[str, Any]:
    """Accuracy per group, the largest gap between groups, and bootstrap 95% intervals."""
    correct = pred.predicted == pred.targets
    names = sorted(str(g) for g in groups.dropna().unique())
    index = {name: np.flatnonzero(groups.astype(str).to_numpy() == name) for name in names}
    per_group = {name: float(correct[idx].mean()) for name, idx in index.items()}
    gap = max(per_group.values()) - min(per_group.values()) if per_group else 0.0
    # Resample within each group so every replicate keeps each group's size.
    gaps, overall = [], []
    for _ in range(samples):
        accs = [correct[rng.choice(idx, len(idx))].mean() for idx in index.values()]
        gaps.append(max(accs) - min(accs))
        overall.append(correct[rng.integers(0, len(correct), len(correct))].mean())
    return {
        "accuracy": per_group,
        "counts": {name: len(idx) for name, idx in index.items()},
        "max_gap": gap,
        "max_gap_ci95": [float(np.percentile(gaps, 2.5)), float(np.percentile(gaps, 97.5))],
        "accuracy_ci95": [float(np.percentile(overall, 2.5)), float(np.percentile(overall, 97.5))],
    }


def calibration(pred: Predictions, bins: int) -> dict[str, Any]:
    """Expected calibration error and the reliability curve (confidence vs accuracy per bin)."""
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
        curve.append({"bin": b, "confidence": conf, "accuracy": acc, "count": int(mask.sum())})
    return {"ece": float(ece), "bins": bins, "curve": curve}


def retrieval_recall(pred: Predictions, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k, each example's own pair being the match."""
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


@torch.no_grad()
def efficiency(
    predictor: Predictor, dataset: MultimodalDataset, batch_sizes: tuple[int, ...], repeats: int
) -> dict[str, Any]:
    """Latency p50/p95 per batch size, throughput, peak memory, parameters, size."""
    loaded = predictor.loaded
    device = next(loaded.model.parameters()).device
    latency = {
        str(bs): measure_latency(
            predictor.runner, cycled_batch(predictor.collate, dataset, bs), repeats
        )
        for bs in batch_sizes
    }
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # the whole process's peak resident memory; Linux reports KiB
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    weights = loaded.folder / WEIGHTS_FILE
    return {
        "device": str(device),
        "backend": predictor.backend,
        "latency": latency,
        "peak_memory_mb": float(peak_mb),
        "parameters": count_parameters(loaded.model),
        "model_size_mb": weights.stat().st_size / 2**20,
    }


def gaussian_noise(std: float, rng: np.random.Generator) -> ImageTransform:
    def apply(image: Image.Image) -> Image.Image:
        pixels = np.asarray(image, dtype=np.float32)
        noisy = pixels + rng.normal(0, std * 255, pixels.shape)
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))

    return apply


def blur(radius: float) -> ImageTransform:
    return lambda image: image.filter(ImageFilter.GaussianBlur(radius))


def typos(rate: float, rng: np.random.Generator) -> TextTransform:
    """Swap, drop or replace one letter in a `rate` share of the words."""
    letters = "abcdefghijklmnopqrstuvwxyz"

    def typo(word: str) -> str:
        if len(word) < 2 or rng.random() >= rate:
            return word
        i = int(rng.integers(0, len(word) - 1))
        kind = rng.integers(0, 3)
        if kind == 0:
            return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        if kind == 1:
            return word[:i] + word[i + 1 :]
        return word[:i] + letters[int(rng.integers(0, 26))] + word[i + 1 :]

    def apply(text: str) -> str:
        return " ".join(typo(word) for word in text.split(" "))

    return apply


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
        ax.text(
            j,
            i,
            str(value),
            ha="center",
            va="center",
            color="white" if value > data.max() / 2 else "black",
            fontsize=8,
        )
    ax.set_title("Confusion matrix (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(calib: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    curve = calib["curve"]
    ax.plot([c["confidence"] for c in curve], [c["accuracy"] for c in curve], "o-", label="model")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {calib['ece']:.3f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Numbers only, dotted keys: for dvc metrics and MLflow."""
    flat: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            # MLflow keys allow letters, digits and _ - . / and spaces; labels may hold more.
            flat[re.sub(r"[^\w\-./ ]", "_", prefix)] = float(value)

    walk("", {k: v for k, v in metrics.items() if k != "confusion_matrix"})
    return flat


def render_report(metrics: dict[str, Any], labels: list[str]) -> str:
    lines = [
        "# Evaluation report",
        "",
        f"Test examples: {metrics['test_examples']}. "
        f"**Accuracy {metrics['accuracy']:.4f}**, macro-F1 {metrics['macro_f1']:.4f}.",
        "",
        "## Per class",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for label in labels:
        c = metrics["per_class"][label]
        lines.append(
            f"| {label} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} "
            f"| {c['support']} |"
        )
    lines += [
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
        "## Modality ablation",
        "",
        "| inputs | accuracy |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" for k, v in metrics["ablation"].items()]
    lines += ["", "## Robustness", "", "| perturbation | accuracy | drop |", "|---|---|---|"]
    lines += [
        f"| {k} | {v['accuracy']:.4f} | {v['drop']:+.4f} |"
        for k, v in metrics["robustness"].items()
    ]
    if "groups" in metrics:
        g = metrics["groups"]
        lines += ["", "## Groups", "", "| group | examples | accuracy |", "|---|---|---|"]
        lines += [f"| {k} | {g['counts'][k]} | {v:.4f} |" for k, v in g["accuracy"].items()]
        lo, hi = g["max_gap_ci95"]
        lines += ["", f"Largest gap {g['max_gap']:.4f} (bootstrap 95% CI {lo:.4f} to {hi:.4f})."]
    cal = metrics["calibration"]
    lines += [
        "",
        "## Calibration",
        "",
        f"ECE {cal['ece']:.4f} over {cal['bins']} bins.",
        "",
        "![reliability diagram](reliability.png)",
    ]
    if "retrieval" in metrics:
        lines += ["", "## Retrieval", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics["retrieval"].items()]
    e = metrics["efficiency"]
    lines += [
        "",
        "## Efficiency",
        "",
        f"Device {e['device']}, {e['parameters']:,} parameters, "
        f"{e['model_size_mb']:.2f} MiB of weights, peak memory {e['peak_memory_mb']:.0f} MiB.",
        "",
        "| batch | p50 ms | p95 ms | examples/s |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {bs} | {v['p50_ms']:.2f} | {v['p95_ms']:.2f} | {v['throughput_per_s']:.0f} |"
        for bs, v in e["latency"].items()
    ]
    return "\n".join(lines) + "\n"


def _write_predictions(
    rows: pd.DataFrame, pred: Predictions, labels: list[str], path: Path
) -> None:
    with path.open("w") as f:
        for example_id, probs in zip(rows["id"], pred.probs, strict=True):
            f.write(
                json.dumps(
                    {
                        "id": example_id,
                        "label": labels[int(probs.argmax())],
                        "scores": {
                            label: round(float(p), 6)
                            for label, p in zip(labels, probs, strict=True)
                        },
                    }
                )
                + "\n"
            )
