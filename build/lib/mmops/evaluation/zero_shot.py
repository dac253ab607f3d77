"""Zero-shot classification by a dual encoder: the image's embedding against each label's prompt
embedding, as CLIP and SigLIP were trained. It is saved as an ordinary mmops model folder, so it
evaluates, exports and serves like any model, and it is the floor a model trained from the same
checkpoint must beat.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from mmops.config import ConfigError, ModelConfig, Params
from mmops.data.dataset import load_splits, split_rows
from mmops.evaluation.metrics import classification_metrics
from mmops.evaluation.predictions import predict_dataset
from mmops.evaluation.records import ZeroShotResult
from mmops.model.backbones import PretrainedTower, from_pretrained, padded_for, split_dual
from mmops.model.classifier import MultimodalClassifier
from mmops.model.image_processing import image_spec_for
from mmops.model.preprocess import MultimodalDataset
from mmops.model.storage import save_model
from mmops.serving.predictor import Predictor

# Prompts embedded per forward pass: 1,000 labels times 80 templates must not be one batch.
PROMPT_BATCH = 256
META_KEY = "zero_shot"  # what a zero-shot model folder's meta records of its making


class NotADualEncoder(ConfigError):
    """A checkpoint for zero-shot that has no image and text towers to match."""


def build_zero_shot(
    checkpoint: str,
    labels: Sequence[str],
    params: Params,
    out_dir: Path | str,
    key: str = "model.pretrained",
) -> Path:
    """Save the zero-shot classifier of the dual encoder `checkpoint` over `labels` (prompts
    from `zero_shot.templates`) as an mmops model folder; `key` names the checkpoint in errors."""
    from transformers import AutoTokenizer

    try:
        vision, text, _ = split_dual(from_pretrained(key, checkpoint), checkpoint)
    except ConfigError:
        raise NotADualEncoder(
            f"{key}: {checkpoint} is not a dual encoder (vision_model and text_model towers, "
            "as CLIP and SigLIP have); zero-shot needs one"
        ) from None
    tokenizer = from_pretrained(key, checkpoint, AutoTokenizer.from_pretrained)
    # The checkpoint's image processor sets the image size, as in training.
    spec = image_spec_for(ModelConfig(pretrained=checkpoint))
    config = ModelConfig(
        fusion="zero_shot",
        pretrained=checkpoint,
        image_size=spec.image_size,
        max_text_length=int(text.config.max_position_embeddings),
    )
    config = padded_for(config, text.config)
    model = MultimodalClassifier(config, len(labels), vision, text).eval()
    templates = params.zero_shot.templates
    with torch.no_grad():
        rows = label_embeddings(text, tokenizer, labels, templates)
        model.head.weight.copy_(rows * model.logit_scale.exp())
    made = {"checkpoint": checkpoint, "templates": list(templates)}
    return save_model(model, tokenizer, list(labels), out_dir, {META_KEY: made}, spec)


def label_embeddings(
    text: PretrainedTower, tokenizer: Any, labels: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """(labels, width): per label, the mean of its prompts' L2-normalised text embeddings,
    normalised again (the prompt ensemble of CLIP's zero-shot ImageNet)."""
    prompts = [prompt(template, label) for label in labels for template in templates]
    # Padded to the tower's full length, as SigLIP was trained: it pools at the last position.
    # CLIP pools at the end-of-text token, which padding after it does not change.
    length = int(text.config.max_position_embeddings)
    embeds = []
    text.eval()
    with torch.no_grad():
        for start in range(0, len(prompts), PROMPT_BATCH):
            tokens = tokenizer(
                prompts[start : start + PROMPT_BATCH],
                padding="max_length",
                max_length=length,
                truncation=True,
                return_tensors="pt",
            )
            summary = text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            embeds.append(F.normalize(summary.summary.float(), dim=-1))
    per_prompt = torch.cat(embeds).view(len(labels), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def prompt(template: str, label: str) -> str:
    """A template with its `{label}` filled in by the label, `_` read as a space."""
    return template.replace("{label}", str(label).replace("_", " "))


def dataset_labels(frame: pd.DataFrame) -> list[str]:
    """The labels a model trained on this dataset knows, sorted: its train split's (all its
    labels when it has no train split, a dataset to evaluate on only)."""
    train = frame[frame["split"] == "train"]
    return sorted((train if len(train) else frame)["label"].unique())


def zero_shot_floor(data_dir: Path | str, params: Params) -> ZeroShotResult | None:
    """The zero-shot test accuracy of the dual encoder `model.pretrained` over the dataset's
    labels, through the serving path; None when no dual encoder is named."""
    checkpoint = params.model.pretrained
    if not checkpoint:
        return None
    start = time.perf_counter()
    frame = load_splits(data_dir, params)
    labels = dataset_labels(frame)
    test = split_rows(frame, "test", data_dir, needed_by="the zero-shot floor")
    with tempfile.TemporaryDirectory(prefix="mmops-zero-shot-") as folder:
        model_dir = build_zero_shot(checkpoint, labels, params, Path(folder) / "model")
        predictor = Predictor(model_dir, "torch", params.predict)
        label_index = {label: i for i, label in enumerate(labels)}
        dataset = MultimodalDataset(data_dir, test, label_index, predictor.image_spec)
        predictions = predict_dataset(predictor, dataset, params.evaluate.batch_size)
    quality = classification_metrics(predictions, labels)
    return ZeroShotResult(
        checkpoint=checkpoint,
        test_accuracy=quality.accuracy,
        test_macro_f1=quality.macro_f1,
        labels=len(labels),
        templates=params.zero_shot.templates,
        seconds=time.perf_counter() - start,
    )
