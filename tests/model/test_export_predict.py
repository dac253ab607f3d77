"""Export to ONNX/INT8 with its parity gate, and the one prediction path, on a trained model."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmops.cli import app
from mmops.config import ExportConfig, Params, PredictConfig
from mmops.data.dataset import load_splits
from mmops.evaluation.evaluate import evaluate_model
from mmops.export.exporter import export_model
from mmops.export.parity import parity
from mmops.export.records import ExportReport
from mmops.model.digests import write_digests
from mmops.serving.predictor import Predictor
from mmops.serving.runners import EXPORT_FILE, ONNX_FILES, Outputs
from mmops.training.train import TrainResult


@pytest.fixture(scope="module")
def exported(
    trained_run: TrainResult,
    demo_dir: Path,
    train_params: Params,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ExportReport, Path]:
    out = tmp_path_factory.mktemp("export") / "model"
    return export_model(trained_run.model_dir, demo_dir, train_params, out), out


@pytest.fixture(scope="module")
def test_records(demo_dir: Path, train_params: Params) -> list[dict[str, Any]]:
    frame = load_splits(demo_dir, train_params)
    return frame[frame["split"] == "test"][["id", "image", "text"]].to_dict("records")


def png_bytes(size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_export_writes_both_models_and_the_verdict(exported: tuple[ExportReport, Path]) -> None:
    report, out = exported

    for name in ONNX_FILES.values():
        assert (out / name).stat().st_size > 0
    written = json.loads((out / EXPORT_FILE).read_text())
    assert written == json.loads(json.dumps(report.to_dict()))
    assert set(written) == {
        "serving",
        "attention",
        "gates",
        "accuracy",
        "size_bytes",
        "latency",
        "test_examples",
        "size_ratio_int8_vs_fp32",
    }
    assert set(written["gates"]["int8"]["recall"].popitem()[1]) == {"torch", "int8"}
    assert report.size_bytes["int8"] < report.size_bytes["fp32"]
    assert set(report.latency) == {"torch", "fp32", "int8"}
    assert set(report.latency["int8"]) == {"1", "8", "32"}
    gates = report.gates
    expected = "int8" if gates.int8.passed else "fp32" if gates.fp32.passed else "torch"
    assert report.serving == expected
    # FP32 ONNX is the same computation as torch, to float rounding.
    assert gates.fp32.passed, gates.fp32.reasons
    assert gates.fp32.max_score_diff < 1e-4


def test_export_quantizes_convolutions_statically_and_matmuls_dynamically(
    exported: tuple[ExportReport, Path],
) -> None:
    import onnx

    report, out = exported
    fp32 = Counter(n.op_type for n in onnx.load(str(out / ONNX_FILES["fp32"])).graph.node)
    int8 = Counter(n.op_type for n in onnx.load(str(out / ONNX_FILES["int8"])).graph.node)

    # The default encoders have no attention (test_onnx_attention.py covers the fused
    # attention of transformers encoders); the one Softmax is the class probabilities'.
    assert report.attention == "fused"
    assert fp32["MultiHeadAttention"] == 0, fp32
    assert fp32["Softmax"] == 1
    # Convolutions calibrated (QDQ, run as QLinearConv), never the slow ConvInteger.
    assert int8["QuantizeLinear"] > 0 and int8["DequantizeLinear"] > 0
    assert "ConvInteger" not in int8
    assert int8["MatMulInteger"] > 0  # weights quantized, activations on the fly


def test_predictor_equals_the_evaluation_stage(
    exported: tuple[ExportReport, Path],
    trained_run: TrainResult,
    demo_dir: Path,
    train_params: Params,
    test_records: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    evaluate_model(trained_run.model_dir, demo_dir, train_params, tmp_path)
    evaluated = [json.loads(line) for line in (tmp_path / "predictions.jsonl").open()]

    predictor = Predictor(exported[1], backend="torch")
    served = predictor.predict_batch(test_records, root=demo_dir)

    assert [s["id"] for s in served] == [e["id"] for e in evaluated]
    for s, e in zip(served, evaluated, strict=True):
        assert s["label"] == e["label"]
        assert s["scores"] == pytest.approx(e["scores"], abs=1e-5)


def test_auto_backend_serves_what_the_gate_chose(
    exported: tuple[ExportReport, Path],
    demo_dir: Path,
    test_records: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    report, out = exported
    assert Predictor(out).backend == report.serving

    # The same folder with a rejected INT8 model serves FP32 ONNX.
    rejected = tmp_path / "rejected"
    shutil.copytree(out, rejected)
    (rejected / EXPORT_FILE).write_text(json.dumps({**report.to_dict(), "serving": "fp32"}))
    write_digests(rejected)  # as the export records its verdict
    fp32 = Predictor(rejected)
    torch_predictor = Predictor(rejected, backend="torch")
    assert fp32.backend == "fp32"
    served = fp32.predict_batch(test_records, root=demo_dir)
    reference = torch_predictor.predict_batch(test_records, root=demo_dir)
    assert [s["label"] for s in served] == [r["label"] for r in reference]

    # A batch of one and texts of a length never seen at export: the ONNX shapes are dynamic.
    one = {**test_records[0], "text": "what colour is it " * 3}
    assert Predictor(out, backend="int8").predict_batch([one], root=demo_dir)[0]["label"]


def test_int8_agrees_with_torch_on_the_test_split(
    exported: tuple[ExportReport, Path], demo_dir: Path, test_records: list[dict[str, Any]]
) -> None:
    report, out = exported
    int8 = Predictor(out, backend="int8").predict_batch(test_records, root=demo_dir)
    reference = Predictor(out, backend="torch").predict_batch(test_records, root=demo_dir)

    agreement = np.mean([a["label"] == b["label"] for a, b in zip(int8, reference, strict=True)])
    assert agreement == pytest.approx(report.gates.int8.agreement)
    assert agreement >= 0.9


def test_parity_gate_names_every_failure() -> None:
    labels = ["a", "b"]
    targets = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    reference = np.eye(2)[targets]
    # The candidate calls three of the four "a" examples "b": recall of "a" collapses.
    candidate = np.eye(2)[np.array([1, 1, 1, 0, 1, 1, 1, 1])]
    embeds = np.zeros((8, 2))

    gate = parity(
        Outputs(reference, {"image": embeds, "text": embeds}),
        Outputs(candidate, {"image": embeds, "text": embeds}),
        targets,
        labels,
        ExportConfig(),
        "int8",
    )

    assert not gate.passed
    assert gate.agreement == pytest.approx(5 / 8)
    assert gate.accuracy_drop == pytest.approx(3 / 8)
    reasons = " | ".join(gate.reasons)
    assert "export.max_accuracy_drop" in reasons
    assert "export.min_agreement" in reasons
    assert "recall of 'a' fell from 1.000 to 0.250" in reasons
    assert "'b'" not in reasons


def test_parity_tolerances_are_inclusive() -> None:
    # Twenty examples of one class; the candidate misses one more: recall 0.75 -> 0.70, a drop
    # of exactly export.max_recall_drop (0.75 - 0.70 is 0.05000000000000004 in floats).
    targets = np.zeros(20, dtype=int)
    reference = np.eye(2)[np.array([0] * 15 + [1] * 5)]
    candidate = np.eye(2)[np.array([0] * 14 + [1] * 6)]
    embeds = np.zeros((20, 2))
    cfg = ExportConfig(max_accuracy_drop=0.05, min_agreement=0.95)

    gate = parity(
        Outputs(reference, {"image": embeds, "text": embeds}),
        Outputs(candidate, {"image": embeds, "text": embeds}),
        targets,
        ["a", "b"],
        cfg,
        "int8",
    )

    assert gate.passed, gate.reasons


def test_bad_records_get_an_error_and_the_rest_are_served(
    exported: tuple[ExportReport, Path], demo_dir: Path, test_records: list[dict[str, Any]]
) -> None:
    config = PredictConfig(max_image_bytes=50_000, max_image_pixels=100_000, max_text_chars=200)
    predictor = Predictor(exported[1], config=config)
    good = test_records[0]
    good_bytes = (demo_dir / good["image"]).read_bytes()
    records: list[Any] = [
        {"id": "raw-bytes", "image": good_bytes, "text": good["text"]},
        {"id": "base64", "image": base64.b64encode(good_bytes).decode(), "text": good["text"]},
        {"id": "text-only", "image": None, "text": good["text"]},
        {"id": "undecodable", "image": b"not an image at all", "text": "what colour?"},
        {"id": "not-base64", "image": "%%% not base64 %%%", "text": "what colour?"},
        {"id": "too-many-bytes", "image": b"\x89PNG" + bytes(60_000), "text": "x"},
        {"id": "too-many-pixels", "image": png_bytes((1000, 1000)), "text": "x"},
        {"id": "long-text", "image": good_bytes, "text": "word " * 100},
        {"id": "text-type", "image": good_bytes, "text": 42},
        {"id": "image-type", "image": 3.5, "text": "x"},
        {"id": "empty", "image": None, "text": None},
        {"image": good_bytes, "text": "no id"},
        {"id": "path-without-root", "image": good["image"], "text": "x"},
        "not a record",
        {"id": "last-good", "image": good_bytes, "text": good["text"]},
    ]

    results = predictor.predict_batch(records)

    assert len(results) == len(records)
    errors = {str(r["id"]): r.get("error") for r in results}
    for served in ("raw-bytes", "base64", "text-only", "last-good"):
        assert errors[served] is None
    assert results[0]["label"] == results[1]["label"] == results[-1]["label"]
    expected = {
        "undecodable": "image: cannot decode",
        "not-base64": "image: not base64",
        "too-many-bytes": "predict.max_image_bytes",
        "too-many-pixels": "1000x1000 is 1000000 pixels",
        "long-text": "predict.max_text_chars",
        "text-type": "text: expected a string or null, got int",
        "image-type": "image: expected bytes, base64 text or a path, got float",
        "empty": "image, text: the record has neither",
        "path-without-root": "image: not base64",
    }
    for record_id, message in expected.items():
        assert message in (errors[record_id] or ""), (record_id, errors[record_id])
    assert "id: missing" in results[11]["error"]
    assert "record: expected an object" in results[13]["error"]
    assert all(r["model"] == exported[1].name and r["version"] == "local" for r in results)


def test_predict_cli_writes_one_line_per_record(
    exported: tuple[ExportReport, Path],
    demo_dir: Path,
    test_records: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    image = test_records[0]["image"]
    shutil.copy(demo_dir / image, tmp_path / "a.png")
    lines = [
        json.dumps({"id": "by-path", "image": "a.png", "text": test_records[0]["text"]}),
        json.dumps({"id": "missing-file", "image": "nope.png", "text": "x"}),
        "{not json",
    ]
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "predictions.jsonl"

    result = CliRunner().invoke(
        app,
        [
            "predict",
            "--model",
            str(exported[1]),
            "--input",
            str(tmp_path / "records.jsonl"),
            "--out",
            str(out),
            "--json",
        ],
    )

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["records"] == 3 and summary["errors"] == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["id"] == "by-path" and "label" in rows[0]
    assert "no such file 'nope.png'" in rows[1]["error"]
    assert "invalid JSON" in rows[2]["error"]
