"""A trained model as one folder: safetensors weights, encoder configs, labels and tokenizer.

It loads without the training code's params.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

from mmops.config import ModelConfig
from mmops.model.classifier import (
    MultimodalClassifier,
    build_text,
    build_vision,
    is_transformers,
    set_stem,
    text_part,
    vision_part,
)

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
        # A transformers encoder is rebuilt from its config; an mmops one from `model`.
        "vision_config": model.vision.config.to_dict() if is_transformers(model.vision) else None,
        "text_config": model.text.config.to_dict() if is_transformers(model.text) else None,
        "vocab_size": len(tokenizer),
        **(extra or {}),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=list) + "\n")
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    return out


def load_model(model_dir: Path | str) -> LoadedModel:
    """Load a folder written by `save_model`, the model in eval mode on the CPU."""
    from safetensors.torch import load_model as load_weights
    from transformers import AutoTokenizer

    from mmops.config import from_mapping

    folder = Path(model_dir)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: not an mmops model folder (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    _upgrade(meta["model"])
    config = from_mapping(ModelConfig, meta["model"], prefix="model")
    tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR))
    vision = _rebuild(meta["vision_config"], vision_part) or build_vision(config)
    if is_transformers(vision) and not config.vision_pretrained:
        set_stem(vision, config.vision)
    text = _rebuild(meta["text_config"], text_part) or build_text(
        config, meta.get("vocab_size", len(tokenizer))
    )
    model = MultimodalClassifier(config, len(meta["labels"]), vision, text)
    load_weights(model, str(folder / WEIGHTS_FILE))
    return LoadedModel(model.eval(), tokenizer, list(meta["labels"]), meta, folder)


def _rebuild(spec: dict[str, Any] | None, part: Callable[[Any], Any]) -> Any:
    """A transformers encoder, freshly initialised from its saved config; None for mmops ones."""
    from transformers import AutoConfig, AutoModel

    if spec is None:
        return None
    spec = dict(spec)
    return part(AutoModel.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec)))


def _upgrade(model: dict[str, Any]) -> None:
    """Fill in keys that models saved by older versions lack, with what those versions did."""
    vision, text = model.setdefault("vision", {}), model.setdefault("text", {})
    # Before the vision stem was a choice: the plain patch projection; before the encoder
    # architectures were a choice: a ViT and a BERT.
    vision.setdefault("stem", "patch")
    vision.setdefault("arch", "vit")
    text.setdefault("arch", "bert")
