"""Export: the trained model to ONNX, quantized to INT8, with a parity gate that picks what serves.

The export folder is self-contained: the torch model folder (weights, configs, labels,
tokenizer) plus `model.onnx`, `model.int8.onnx` and `export.json`, whose `serving` field names
the artifact `Predictor` runs. INT8 serves only when it passes the gate against the torch
model on the test split; otherwise FP32 ONNX serves, and torch if even FP32 ONNX disagrees.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mmops.config import ExportConfig, Params
from mmops.data.dataset import load_splits, split_rows
from mmops.export.attention import fused_attention, translation_table
from mmops.model.classifier import MultimodalClassifier
from mmops.model.preprocess import MODEL_INPUTS, MultimodalDataset
from mmops.model.storage import META_FILE, LoadedModel
from mmops.serving.predictor import Predictor
from mmops.serving.runners import (
    EXPORT_FILE,
    ONNX_FILES,
    OnnxRunner,
    Outputs,
    cycled_batch,
    measure_latency,
    run_loader,
)

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("probs", "image_embeds", "text_embeds")
# Files of the torch model folder that travel with the export (training state does not).
_MODEL_FILES = ("model.safetensors", META_FILE, "tokenizer", "mlflow_run.json")
# Train rows whose activation ranges calibrate the statically quantized convolutions.
CALIBRATION_ROWS = 256


class ServingModel(nn.Module):
    """The classifier as served: class probabilities and the two embeddings."""

    def __init__(self, model: MultimodalClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_present: torch.Tensor,
        text_present: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values, input_ids, attention_mask, image_present, text_present)
        return out.logits.float().softmax(-1), out.image_embeds, out.text_embeds


def export_model(
    model_dir: Path | str, data_dir: Path | str, params: Params, out_dir: Path | str | None = None
) -> dict[str, Any]:
    """Export FP32 and INT8 ONNX models, gate INT8 on the test split, write export.json."""
    cfg = params.export
    out = Path(out_dir or cfg.out_dir)
    _copy_model_folder(Path(model_dir), out)
    # The torch side of the gate is the prediction path itself, forced to the torch backend.
    reference = Predictor(out, backend="torch", config=params.predict)
    loaded, collate = reference.loaded, reference.collate
    config = loaded.model.config

    frame = load_splits(data_dir, params)
    test = split_rows(frame, "test", data_dir, needed_by="the parity gate")
    label_index = {label: i for i, label in enumerate(loaded.labels)}
    dataset = MultimodalDataset(data_dir, test, label_index, config.image_size)
    # Decoded once: every backend sees the same tensors.
    batches = list(DataLoader(dataset, batch_size=params.predict.batch_size, collate_fn=collate))
    targets = torch.cat([b["labels"] for b in batches]).numpy()

    fp32_path, int8_path = out / ONNX_FILES["fp32"], out / ONNX_FILES["int8"]
    attention = export_onnx(loaded, batches[0], fp32_path)
    # Static INT8 calibrates on the first train rows, batched as served.
    train = split_rows(frame, "train", data_dir).head(CALIBRATION_ROWS)
    calibration = MultimodalDataset(data_dir, train, label_index, config.image_size)
    quantize_int8(
        fp32_path,
        int8_path,
        list(DataLoader(calibration, batch_size=params.predict.batch_size, collate_fn=collate)),
    )

    runners = {
        "torch": reference.runner,
        "fp32": OnnxRunner(fp32_path, "fp32", params.predict.threads),
        "int8": OnnxRunner(int8_path, "int8", params.predict.threads),
    }
    outputs = {name: run_loader(runner, batches) for name, runner in runners.items()}
    gates = {
        name: parity(outputs["torch"], outputs[name], targets, loaded.labels, cfg, name)
        for name in ("fp32", "int8")
    }
    serving = "int8" if gates["int8"]["passed"] else "fp32" if gates["fp32"]["passed"] else "torch"
    for name, gate in gates.items():
        if not gate["passed"]:
            log.warning("%s ONNX model rejected: %s", name, "; ".join(gate["reasons"]))
    repeats = cfg.latency_repeats
    report = {
        "serving": serving,
        "attention": attention,
        "gates": gates,
        "accuracy": {name: _accuracy(o, targets) for name, o in outputs.items()},
        "size_bytes": {
            "torch": (out / "model.safetensors").stat().st_size,
            "fp32": fp32_path.stat().st_size,
            "int8": int8_path.stat().st_size,
        },
        "latency": {
            name: {
                str(bs): measure_latency(runner, cycled_batch(collate, dataset, bs), repeats)
                for bs in cfg.latency_batch_sizes
            }
            for name, runner in runners.items()
        },
        "test_examples": len(test),
    }
    report["size_ratio_int8_vs_fp32"] = report["size_bytes"]["int8"] / report["size_bytes"]["fp32"]
    (out / EXPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def export_onnx(loaded: LoadedModel, batch: dict[str, torch.Tensor], path: Path) -> str:
    """The model as ONNX with a dynamic batch size and text length; says how attention went."""
    model = ServingModel(loaded.model.eval())
    args = tuple(batch[name] for name in MODEL_INPUTS)
    dynamic = torch.export.Dim.DYNAMIC
    dynamic_shapes = {
        "pixel_values": {0: dynamic},
        "input_ids": {0: dynamic, 1: dynamic},
        "attention_mask": {0: dynamic, 1: dynamic},
        "image_present": {0: dynamic},
        "text_present": {0: dynamic},
    }
    try:
        # One fused MultiHeadAttention node per attention block instead of a dozen plain ops.
        with fused_attention(loaded.model):
            program = _export(model, args, dynamic_shapes, translation_table())
        attention = "fused"
    except Exception as error:  # an encoder whose attention cannot be routed (a custom model)
        log.warning("fused attention did not export (%s); exporting plain attention", error)
        program = _export_eager(loaded, model, args, dynamic_shapes)
        attention = "plain"
    program.save(str(path))
    _strip_metadata(path)
    return attention


def _export_eager(
    loaded: LoadedModel, model: nn.Module, args: tuple[torch.Tensor, ...], dynamic_shapes: Any
) -> Any:
    # Eager attention exports as plain MatMul/Softmax; the SDPA path decomposes into extra
    # masking ops (Where, IsNaN) that cost ONNX Runtime about a tenth of its time. Same weights.
    encoders = [loaded.model.vision.config, loaded.model.text.config]
    attention = [getattr(c, "_attn_implementation", None) for c in encoders]
    for config in encoders:
        config._attn_implementation = "eager"
    try:
        return _export(model, args, dynamic_shapes)
    finally:
        for config, previous in zip(encoders, attention, strict=True):
            config._attn_implementation = previous


def _export(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    dynamic_shapes: Any,
    translations: dict[Any, Any] | None = None,
) -> Any:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter chatter about ops it decomposes
        return torch.onnx.export(
            model,
            args,
            dynamo=True,
            input_names=list(MODEL_INPUTS),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=translations,
            verbose=False,
        )


def quantize_int8(
    fp32_path: Path, int8_path: Path, calibration: Sequence[dict[str, torch.Tensor]] = ()
) -> Path:
    """INT8: MatMul and embedding weights dynamically; convolutions statically, when given
    calibration batches (activation ranges measured on them)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX Runtime's graph optimisation folds slices of weights (attention in-projections)
        # and batch norms into initializers the quantizer can see. Symbolic shape inference
        # cannot follow the exporter's dynamic text length, and quantization does not need it.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        _gemm_to_matmul(prepared)
        static = bool(calibration) and _has_op(prepared, "Conv")
        dynamic = Path(tmp) / "dynamic.onnx" if static else int8_path
        quantize_dynamic(
            prepared,
            dynamic,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gather"],
        )
        if static:
            # Dynamic quantization would make convolutions ConvInteger, which has no fast CPU
            # kernel (slower than FP32); calibrated QDQ convolutions run as QLinearConv, fused
            # with their ReLU.
            quantize_static(
                dynamic,
                int8_path,
                _Calibration(calibration),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["Conv", "Relu"],
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
    return int8_path


class _Calibration:
    """Feeds batches to ONNX Runtime's calibrator (a `CalibrationDataReader`)."""

    def __init__(self, batches: Sequence[dict[str, torch.Tensor]]) -> None:
        self.batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {name: batch[name].numpy() for name in MODEL_INPUTS}


def _has_op(path: Path, op_type: str) -> bool:
    import onnx

    return any(node.op_type == op_type for node in onnx.load(str(path)).graph.node)


def _strip_metadata(path: Path) -> None:
    # The exporter annotates every node with its torch source; serving does not need ~1 MB of it.
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(model, str(path))


def _gemm_to_matmul(path: Path) -> None:
    """Rewrite Gemm with a constant weight as MatMul + Add, which dynamic quantization covers."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        if (
            node.op_type != "Gemm"
            or not plain
            or attrs.get("transA", 0)
            or node.input[1] not in weights
        ):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        name = f"{node.input[1]}_matmul"
        graph.initializer.append(
            numpy_helper.from_array(weight.T.copy() if attrs.get("transB", 0) else weight, name)
        )
        product = f"{node.output[0]}_product" if len(node.input) > 2 else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product]))
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]]))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for tensor in unused:  # the Gemm weights now held transposed
        graph.initializer.remove(tensor)
    onnx.save(model, str(path))


def parity(
    reference: Outputs,
    candidate: Outputs,
    targets: np.ndarray,
    labels: list[str],
    cfg: ExportConfig,
    name: str,
) -> dict[str, Any]:
    """Whether `candidate` may replace the torch model; `reasons` says why not."""
    ref, cand = reference.probs.argmax(1), candidate.probs.argmax(1)
    agreement = float((ref == cand).mean())
    accuracy_drop = float((ref == targets).mean() - (cand == targets).mean())
    max_diff = float(np.abs(reference.probs - candidate.probs).max())
    recall = {}
    for i, label in enumerate(labels):
        rows = targets == i
        if rows.any():
            recall[label] = {
                "torch": float((ref[rows] == i).mean()),
                name: float((cand[rows] == i).mean()),
            }
    # Tolerances are inclusive: a drop of exactly max_recall_drop (one example of twenty)
    # passes, whatever the float rounding of 0.75 - 0.70.
    eps = 1e-9
    reasons = []
    if accuracy_drop > cfg.max_accuracy_drop + eps:
        reasons.append(
            f"accuracy is {accuracy_drop * 100:.2f} points below torch's "
            f"(export.max_accuracy_drop {cfg.max_accuracy_drop})"
        )
    if agreement < cfg.min_agreement - eps:
        reasons.append(
            f"agrees with torch on {agreement:.4f} of the test split "
            f"(export.min_agreement {cfg.min_agreement})"
        )
    for label, r in recall.items():
        if r["torch"] - r[name] > cfg.max_recall_drop + eps:
            reasons.append(
                f"recall of {label!r} fell from {r['torch']:.3f} to {r[name]:.3f} "
                f"(export.max_recall_drop {cfg.max_recall_drop})"
            )
    if name == "fp32" and max_diff > cfg.fp32_tolerance:
        reasons.append(
            f"class scores differ from torch by up to {max_diff:.2e} "
            f"(export.fp32_tolerance {cfg.fp32_tolerance})"
        )
    return {
        "passed": not reasons,
        "reasons": reasons,
        "agreement": agreement,
        "accuracy_drop": accuracy_drop,
        "max_score_diff": max_diff,
        "recall": recall,
    }


def _accuracy(outputs: Outputs, targets: np.ndarray) -> float:
    return float((outputs.probs.argmax(1) == targets).mean())


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


def export_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The export report as flat numbers, for MLflow and `dvc metrics`."""
    flat: dict[str, float] = {
        f"export.accuracy.{name}": value for name, value in report["accuracy"].items()
    }
    flat.update({f"export.size_bytes.{k}": v for k, v in report["size_bytes"].items()})
    flat["export.size_ratio_int8_vs_fp32"] = report["size_ratio_int8_vs_fp32"]
    for name, gate in report["gates"].items():
        flat[f"export.{name}.passed"] = float(gate["passed"])
        flat[f"export.{name}.agreement"] = gate["agreement"]
        flat[f"export.{name}.accuracy_drop"] = gate["accuracy_drop"]
    for name, by_size in report["latency"].items():
        for size, figures in by_size.items():
            flat[f"export.latency.{name}.bs{size}.p50_ms"] = figures["p50_ms"]
    return flat
