"""A dual-encoder (CLIP) backbone through the whole path on a tiny random checkpoint: train,
evaluate, export through the INT8 parity gate with fused attention, and predict."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

from mmops.config import load_params
from mmops.data.dataset import load_splits
from mmops.evaluation.evaluate import evaluate_model
from mmops.export.exporter import export_model
from mmops.serving.predictor import Predictor
from mmops.stream.replay import dataset_events
from mmops.training.train import train
from mmops.training.validation_gate import DataValidation


def clip_checkpoint(folder: Path, vocab_texts: list[str]) -> Path:
    """A CLIP at tiny dimensions (48 px, where the demo's default image size is 64), random
    weights, with a tokenizer and an image processor beside it, as a hub checkpoint has."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from mmops.model.preprocess import train_tokenizer

    tokenizer = train_tokenizer(vocab_texts, 300, 32)
    tokenizer.save_pretrained(str(folder))
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    text = {
        **common,
        "num_attention_heads": 2,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 32,
        "eos_token_id": tokenizer.sep_token_id,
    }
    vision = {**common, "num_attention_heads": 2, "image_size": 48, "patch_size": 8}
    torch.manual_seed(0)
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    ).save_pretrained(str(folder))
    size = {"shortest_edge": 48}
    CLIPImageProcessor(size=size, crop_size={"height": 48, "width": 48}).save_pretrained(
        str(folder)
    )
    return folder


@pytest.fixture(scope="module")
def clip_run(
    demo_dir: Path,
    demo_validation: DataValidation,
    tiny_overrides: tuple[str, ...],
    tmp_path_factory: pytest.TempPathFactory,
):  # type: ignore[no-untyped-def]
    texts = list(load_splits(demo_dir, load_params(None, tiny_overrides))["text"].dropna())
    checkpoint = clip_checkpoint(tmp_path_factory.mktemp("clip"), texts)
    params = load_params(
        None,
        [
            *tiny_overrides,
            f"model.pretrained={checkpoint}",
            "train.epochs=2",
            "train.min_steps=0",
            "train.lr=0.003",
        ],
    )
    out = tmp_path_factory.mktemp("clip-model")
    result = train(demo_dir, params, out_dir=out, progress=False, validation=demo_validation)
    return params, result


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
