"""A trained model as one folder: safetensors weights, encoder configs, labels and tokenizer.

It loads without the training code's params.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

from mmops.config import ModelConfig
from mmops.model.classifier import MultimodalClassifier, set_stem, text_part, vision_part

WEIGHTS_FILE = "model.safetensors"


META_FILE = "mmops_model.json"


TOKENIZER_DIR = "tokenizer"


class LoadedModel(NamedTuple):
    model: MultimodalClassifier
    tokenizer: Any
    labels: list[str]
    meta: dict[str, Any]
    folder: Path


def save_model(
    model: MultimodalClassifier,
    tokenizer: Any,
    labels: list[str],
    out_dir: Path | str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write weights (safetensors), encoder configs, labels and tokenizer to one folder."""
    from safetensors.torch import save_model as save_weights

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    save_weights(model, str(out / WEIGHTS_FILE))
    meta = {
        "format": 1,
        "labels": labels,
        "model": asdict(model.config),
        "vision_config": model.vision.config.to_dict(),
        "text_config": model.text.config.to_dict(),
        **(extra or {}),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=list) + "\n")
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    return out


def load_model(model_dir: Path | str) -> LoadedModel:
    """Load a folder written by `save_model`, the model in eval mode on the CPU."""
    from safetensors.torch import load_model as load_weights
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from mmops.config import from_mapping

    folder = Path(model_dir)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: not an mmops model folder (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    # Models saved before the vision stem was a choice have the plain patch projection.
    meta["model"].get("vision", {}).setdefault("stem", "patch")
    config = from_mapping(ModelConfig, meta["model"], prefix="model")
    encoders = []
    for key in ("vision_config", "text_config"):
        spec = dict(meta[key])
        encoder_config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        encoders.append(AutoModel.from_config(encoder_config))
    vision, text = vision_part(encoders[0]), text_part(encoders[1])
    if not config.vision_pretrained:
        set_stem(vision, config.vision)
    model = MultimodalClassifier(config, len(meta["labels"]), vision, text)
    load_weights(model, str(folder / WEIGHTS_FILE))
    tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR))
    return LoadedModel(model.eval(), tokenizer, list(meta["labels"]), meta, folder)
