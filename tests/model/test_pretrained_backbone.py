"""A dual-encoder (CLIP) backbone through the whole path on a tiny random checkpoint: train,
evaluate, export through the INT8 parity gate with fused attention, and predict."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from mmops.data.dataset import load_splits
from mmops.evaluation.evaluate import evaluate_model
from mmops.export.exporter import export_model
from mmops.serving.predictor import Predictor
from mmops.stream.replay import dataset_events


def test_a_dual_encoder_trains_at_its_checkpoints_image_size(clip_run) -> None:  # type: ignore[no-untyped-def]
    _, result = clip_run
    meta = json.loads((Path(result.model_dir) / "mmops_model.json").read_text())
    assert meta["model"]["image_size"] == 48  # from the checkpoint, not params' 64
    assert meta["dual_config"]["model_type"] == "clip"


def test_a_dual_encoder_evaluates_exports_and_predicts(
    clip_run,
    demo_dir: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    params, result = clip_run
    report = evaluate_model(result.model_dir, demo_dir, params, tmp_path / "evaluate")
    assert 0.0 <= report.classification.accuracy <= 1.0
    exported = export_model(result.model_dir, demo_dir, params, tmp_path / "export")
    assert exported.gates.fp32.passed, exported.gates.fp32.reasons
    graph = onnx.load(str(tmp_path / "export" / "model.onnx")).graph
    fused = [node for node in graph.node if node.op_type == "MultiHeadAttention"]
    assert len(fused) == 4  # each CLIP attention layer, 2 per tower, is one fused node
    rows = load_splits(demo_dir, params)
    events = dataset_events(rows[rows["split"] == "test"].head(8).to_dict("records"), demo_dir)
    served = Predictor(tmp_path / "export").predict_batch(events)
    reference = Predictor(tmp_path / "export", backend="torch").predict_batch(events)
    assert all("label" in r for r in served)
    agree = sum(a["label"] == b["label"] for a, b in zip(served, reference, strict=True))
    assert agree >= 7
