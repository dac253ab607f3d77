"""A trained model as one folder: safetensors weights, encoder configs, labels and tokenizer.

It loads without the training code's params.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

from mmops.config import ModelConfig
from mmops.model.backbones import rebuild_dual
from mmops.model.classifier import (
    MultimodalClassifier,
    build_text,
    build_vision,
    is_transformers,
    set_stem,
    text_part,
    vision_part,
)
from mmops.model.digests import write_digests
from mmops.model.folder import META_FILE, TOKENIZER_DIR, WEIGHTS_FILE, read_meta
from mmops.model.image_processing import SPEC_KEY, ImageSpec, image_spec_for, image_spec_of

__all__ = ["META_FILE", "TOKENIZER_DIR", "WEIGHTS_FILE", "LoadedModel", "load_model", "save_model"]


class LoadedModel(NamedTuple):
    model: MultimodalClassifier
    tokenizer: Any
    labels: list[str]
    meta: dict[str, Any]
    folder: Path
    image_spec: ImageSpec  # how its images are preprocessed (the default for older models)


def save_model(
    model: MultimodalClassifier,
    tokenizer: Any,
    labels: list[str],
    out_dir: Path | str,
    extra: dict[str, Any] | None = None,
    image_spec: ImageSpec | None = None,
) -> Path:
    """Write weights (safetensors), encoder configs, labels, tokenizer and image preprocessing
    (`image_spec`, by default `image_spec_for` the model's config) to one folder."""
    from safetensors.torch import save_model as save_weights

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    model = _merge_adapters(model)
    save_weights(model, str(out / WEIGHTS_FILE))
    meta = {
        "format": 1,
        "labels": labels,
        "model": asdict(model.config),
        # A transformers encoder is rebuilt from its config; an mmops one from `model`; the
        # towers of a dual encoder from the dual encoder's config.
        "vision_config": _encoder_config(model.vision),
        "text_config": _encoder_config(model.text),
        "dual_config": _dual_config(model.vision),
        "vocab_size": len(tokenizer),
        SPEC_KEY: (image_spec or image_spec_for(model.config)).to_dict(),
        **(extra or {}),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=list) + "\n")
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    write_digests(out)  # last: a folder half rewritten no longer matches its manifest
    return out


def load_model(model_dir: Path | str) -> LoadedModel:
    """Load a folder written by `save_model`, the model in eval mode on the CPU."""
    from safetensors.torch import load_model as load_weights
    from transformers import AutoTokenizer

    from mmops.config import from_mapping

    folder = Path(model_dir)
    meta = read_meta(folder)
    config = from_mapping(ModelConfig, meta["model"], prefix="model")
    tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR))
    if meta.get("dual_config"):
        vision, text, _ = rebuild_dual(meta["dual_config"])
    else:
        vision = _rebuild(meta["vision_config"], vision_part) or build_vision(config)
        if is_transformers(vision) and not config.vision_pretrained:
            set_stem(vision, config.vision)
        text = _rebuild(meta["text_config"], text_part) or build_text(
            config, meta.get("vocab_size", len(tokenizer))
        )
    model = MultimodalClassifier(config, len(meta["labels"]), vision, text)
    load_weights(model, str(folder / WEIGHTS_FILE))
    return LoadedModel(
        model.eval(), tokenizer, list(meta["labels"]), meta, folder, image_spec_of(meta)
    )


def _merge_adapters(model: MultimodalClassifier) -> MultimodalClassifier:
    """The model with its encoders' LoRA adapters (peft) merged into their weights: a plain
    mmops model, which loads, exports and serves without peft. `model` itself keeps them."""
    if not any(_is_peft(m) for m in model.modules()):
        return model
    # A copy, since training goes on with the adapters after saving an epoch's best model.
    merged = copy.deepcopy(model)
    _unwrap_peft(merged)
    return merged


def _unwrap_peft(module: Any) -> None:
    """Replace each outermost peft model below `module` by its base model, adapters merged."""
    for name, child in module.named_children():
        if _is_peft(child):
            setattr(module, name, child.merge_and_unload())
        else:
            _unwrap_peft(child)


def _is_peft(module: Any) -> bool:
    # By its class's module, so saving a model without adapters never imports peft.
    return type(module).__module__.startswith("peft.") and hasattr(module, "merge_and_unload")


def _encoder_config(encoder: Any) -> dict[str, Any] | None:
    if getattr(encoder, "dual_config", None) is not None or not is_transformers(encoder):
        return None
    return encoder.config.to_dict()


def _dual_config(encoder: Any) -> dict[str, Any] | None:
    dual = getattr(encoder, "dual_config", None)
    return None if dual is None else dual.to_dict()


def _rebuild(spec: dict[str, Any] | None, part: Callable[[Any], Any]) -> Any:
    """A transformers encoder, freshly initialised from its saved config; None for mmops ones."""
    from transformers import AutoConfig, AutoModel

    if spec is None:
        return None
    spec = dict(spec)
    return part(AutoModel.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec)))
