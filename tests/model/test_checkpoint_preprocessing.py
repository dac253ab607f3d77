"""A vision checkpoint trains and serves at its own image size and preprocessing, whatever
`model.image_size` says."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from mmops.config import load_params
from mmops.data.dataset import read_manifest
from mmops.model.image_processing import ImageSpec
from mmops.model.storage import load_model
from mmops.serving.predictor import Predictor
from mmops.training.train import train
from mmops.training.validation_gate import DataValidation


def test_a_vit_checkpoint_trains_and_predicts_at_its_own_image_size(
    demo_dir: Path,
    demo_validation: DataValidation,
    tiny_overrides: tuple[str, ...],
    tmp_path: Path,
) -> None:
    checkpoint = tmp_path / "vit"
    torch.manual_seed(0)
    vit = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=48,
        patch_size=16,
    )
    ViTModel(vit).save_pretrained(checkpoint)
    # The mean and std of an ImageNet-21k ViT are 0.5; these make the spec's own arithmetic run.
    processor = ViTImageProcessor(
        size={"height": 48, "width": 48}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]
    )
    processor.save_pretrained(checkpoint)
    params = load_params(
        None, [*tiny_overrides, f"model.vision_pretrained={checkpoint}", "train.epochs=1"]
    )
    assert params.model.image_size == 64  # the default, never set

    result = train(
        demo_dir, params, out_dir=tmp_path / "run", progress=False, validation=demo_validation
    )
    loaded = load_model(result.model_dir)
    predictor = Predictor(result.model_dir)
    rows = read_manifest(demo_dir).head(8)
    records = [{"id": row.id, "text": row.text, "image": row.image} for row in rows.itertuples()]
    results = predictor.predict_batch(records, root=demo_dir)
    batch = predictor.collate([predictor.example(r, demo_dir) for r in records])

    spec = ImageSpec(size=(48, 48), mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    assert loaded.model.config.image_size == 48
    assert loaded.image_spec == predictor.image_spec == spec
    assert batch["pixel_values"].shape == (8, 3, 48, 48)
    assert all(r["label"] in loaded.labels for r in results)
