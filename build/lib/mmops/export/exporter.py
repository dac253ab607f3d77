"""Export: the trained model to ONNX, quantized to INT8, with a parity gate that picks what serves.

The export folder is self-contained: the torch model folder (weights, configs, labels,
tokenizer) plus `model.onnx`, `model.int8.onnx`, `export.json`, whose `serving` field names
the artifact `Predictor` runs, and `digests.json`, the SHA-256 of every file. INT8 serves only
when it passes the gate against the torch model on the test split; otherwise FP32 ONNX serves,
and torch if even FP32 ONNX disagrees.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from mmops.config import ExportConfig, Params
from mmops.data.dataset import load_splits, split_rows
from mmops.export.onnx import export_onnx
from mmops.export.parity import parity
from mmops.export.quantize import quantize_int8
from mmops.export.records import ExportReport, Gates
from mmops.model.digests import write_digests, write_manifest
from mmops.model.preprocess import MultimodalDataset
from mmops.model.storage import META_FILE
from mmops.serving.embeddings import sample_references
from mmops.serving.inputs import ArrayCollator
from mmops.serving.integrity import read_manifest
from mmops.serving.predictor import Predictor
from mmops.serving.runners import (
    EXPORT_FILE,
    ONNX_FILES,
    OnnxRunner,
    Outputs,
    Runner,
    cycled_batch,
    measure_latency,
    run_loader,
)

log = logging.getLogger(__name__)

# Files of the torch model folder that travel with the export (training state does not).
_MODEL_FILES = ("model.safetensors", META_FILE, "tokenizer", "mlflow_run.json")
# Train rows whose activation ranges calibrate the statically quantized convolutions.
CALIBRATION_ROWS = 256


def export_model(
    model_dir: Path | str, data_dir: Path | str, params: Params, out_dir: Path | str | None = None
) -> ExportReport:
    """Export FP32 and INT8 ONNX models, gate INT8 on the test split, write export.json."""
    cfg = params.export
    out = Path(out_dir or cfg.out_dir)
    _copy_model_folder(Path(model_dir), out)
    _copy_digests(Path(model_dir), out)
    # The torch side of the gate is the prediction path itself, forced to the torch backend.
    reference = Predictor(out, backend="torch", config=params.predict)
    loaded, collate = reference.loaded, reference.collate
    label_index = {label: i for i, label in enumerate(loaded.labels)}

    def dataset(rows: pd.DataFrame) -> MultimodalDataset:
        return MultimodalDataset(data_dir, rows, label_index, reference.image_spec)

    def batched(data: MultimodalDataset) -> list[dict[str, np.ndarray]]:
        # Decoded once: every backend sees the same tensors.
        return list(DataLoader(data, batch_size=params.predict.batch_size, collate_fn=collate))

    frame = load_splits(data_dir, params)
    test_rows = split_rows(frame, "test", data_dir, needed_by="the parity gate")
    test = dataset(test_rows)
    batches = batched(test)
    targets = np.concatenate([b["labels"] for b in batches])

    fp32_path, int8_path = out / ONNX_FILES["fp32"], out / ONNX_FILES["int8"]
    attention = export_onnx(loaded, batches[0], fp32_path)
    # Static INT8 calibrates on the first train rows, batched as served.
    train = split_rows(frame, "train", data_dir).head(CALIBRATION_ROWS)
    quantize_int8(fp32_path, int8_path, batched(dataset(train)))

    runners: dict[str, Runner] = {
        "torch": reference.runner,
        "fp32": OnnxRunner(fp32_path, "fp32", params.predict.threads),
        "int8": OnnxRunner(int8_path, "int8", params.predict.threads),
    }
    outputs = {name: run_loader(runner, batches) for name, runner in runners.items()}
    gates = _gate(outputs, targets, loaded.labels, cfg)
    report = ExportReport(
        serving=gates.serving(),
        attention=attention,
        gates=gates,
        accuracy={name: _accuracy(o, targets) for name, o in outputs.items()},
        size_bytes={
            "torch": (out / "model.safetensors").stat().st_size,
            "fp32": fp32_path.stat().st_size,
            "int8": int8_path.stat().st_size,
        },
        latency=_latency(runners, collate, test, cfg),
        test_examples=len(test),
    )
    (out / EXPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    val_rows = split_rows(frame, "val", data_dir)
    val = run_loader(runners[report.serving], batched(dataset(val_rows)))
    held_out = {"val": (val_rows, val), "test": (test_rows, outputs[report.serving])}
    _save_references(out, held_out, loaded.labels, report.serving, params)
    write_digests(out)  # registration tags them; loading checks every file against them
    return report


def _save_references(
    out: Path,
    held_out: dict[str, tuple[pd.DataFrame, Outputs]],
    labels: list[str],
    backend: str,
    params: Params,
) -> None:
    """Reference embeddings for the drift monitor: what the served backend gives on rows it
    never trained on. A modality a row lacks (an empty cell) is marked absent, not watched."""
    parts = {split: outputs for split, (_, outputs) in held_out.items()}
    modalities = {m for _, outputs in held_out.values() for m in outputs.embeds}
    present = {
        m: np.concatenate(
            [
                rows[m].map(lambda v: isinstance(v, str)).to_numpy(bool)
                for rows, _ in held_out.values()
            ]
        )
        for m in modalities
        if all(m in rows.columns for rows, _ in held_out.values())
    }
    drift = params.drift
    references = sample_references(
        parts, labels, drift.reference_size, backend, drift.seed, present
    )
    references.save(out)


def _gate(
    outputs: dict[str, Outputs], targets: np.ndarray, labels: list[str], cfg: ExportConfig
) -> Gates:
    """Each ONNX model against torch; a rejection is logged with its reasons."""
    gates = Gates(
        fp32=parity(outputs["torch"], outputs["fp32"], targets, labels, cfg, "fp32"),
        int8=parity(outputs["torch"], outputs["int8"], targets, labels, cfg, "int8"),
    )
    for gate in gates.all():
        if not gate.passed:
            log.warning("%s ONNX model rejected: %s", gate.candidate, "; ".join(gate.reasons))
    return gates


def _latency(
    runners: dict[str, Runner],
    collate: ArrayCollator,
    dataset: MultimodalDataset,
    cfg: ExportConfig,
) -> dict[str, dict[str, dict[str, float]]]:
    """p50/p95 latency and throughput of every backend, per batch size."""
    return {
        name: {
            str(bs): measure_latency(
                runner, cycled_batch(collate, dataset, bs), cfg.latency_repeats
            )
            for bs in cfg.latency_batch_sizes
        }
        for name, runner in runners.items()
    }


def _accuracy(outputs: Outputs, targets: np.ndarray) -> float:
    return float((outputs.probs.argmax(1) == targets).mean())


def _copy_digests(model_dir: Path, out: Path) -> None:
    """The source's digests of the copied files: loading the copy checks it against them."""
    source = read_manifest(model_dir)
    if source.files is None:  # a model saved before digests: the copy is what there is
        write_digests(out)
        return
    copied = {k: v for k, v in source.files.items() if k.split("/")[0] in _MODEL_FILES}
    write_manifest(out, copied, source.source)


def _copy_model_folder(model_dir: Path, out: Path) -> None:
    if not (model_dir / META_FILE).is_file():
        raise FileNotFoundError(f"{model_dir}: not an mmops model folder (no {META_FILE})")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in _MODEL_FILES:
        source = model_dir / name
        if source.is_dir():
            shutil.copytree(source, out / name)
        elif source.is_file():
            shutil.copy2(source, out / name)
