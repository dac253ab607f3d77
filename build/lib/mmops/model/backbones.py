"""Pretrained backbones: a dual-encoder checkpoint (CLIP, SigLIP and their relatives) split into
its two towers, each giving token states and the checkpoint's own embedding, loaded once.

A tower is the checkpoint's transformer and its projection head, so its summary is exactly what
the checkpoint's `get_image_features` / `get_text_features` return (its pooling, its projection):
CLIP's text tower pools at the end-of-text token, not at token 0, which sees only itself under a
causal mask. The fusion head reads the summaries; cross-attention reads the token states.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import nn

from mmops.config import ConfigError, ModelConfig


class PretrainedUnavailable(ValueError):
    """A checkpoint named in params.yaml that cannot be loaded (offline, misspelt, not a model)."""


def from_pretrained(key: str, name: str, loader: Any = None) -> Any:
    """`loader(name)` (AutoModel.from_pretrained by default); one clear error naming the key
    and the checkpoint if it cannot be loaded."""
    if loader is None:
        from transformers import AutoModel

        loader = AutoModel.from_pretrained
    try:
        return loader(name)
    except (OSError, ValueError) as error:
        lines = str(error).strip().splitlines()
        first = lines[0] if lines else type(error).__name__
        raise PretrainedUnavailable(f"{key}: cannot load {name!r}: {first}") from None


class TowerOutput(NamedTuple):
    tokens: torch.Tensor  # (batch, sequence, width): for cross-attention
    summary: torch.Tensor  # (batch, summary_width): the checkpoint's embedding


class PretrainedTower(nn.Module):
    """One tower of a dual encoder: `model(...)` then `projection(pooler_output)`."""

    def __init__(self, model: nn.Module, projection: nn.Module | None, kind: str) -> None:
        super().__init__()
        self.model = model
        self.projection = projection if projection is not None else nn.Identity()
        self.kind = kind  # image | text
        self.config = model.config
        self.width = model.config.hidden_size
        out = getattr(projection, "out_features", None)
        self.summary_width = out or self.width
        self.logit_scale_init: torch.Tensor | None = None
        self.dual_config: Any = None

    def forward(self, **inputs: Any) -> TowerOutput:
        output = self.model(**inputs, return_dict=True)
        return TowerOutput(output.last_hidden_state, self.projection(output.pooler_output))


def load_dual(name: str) -> tuple[PretrainedTower, PretrainedTower, nn.Module]:
    """Both towers of the dual-encoder checkpoint `name` (hub name or folder), read once, and the
    whole model (for its logit scale)."""
    return split_dual(from_pretrained("model.pretrained", name), name)


def split_dual(model: nn.Module, name: str = "model.pretrained") -> tuple[Any, Any, nn.Module]:
    """The image and text towers of a dual-encoder model."""
    if not (hasattr(model, "vision_model") and hasattr(model, "text_model")):
        raise ConfigError(
            f"model.pretrained: {name} ({type(model).__name__}) is not a dual encoder with "
            "vision_model and text_model towers; name each tower's checkpoint with "
            "model.vision_pretrained and model.text_pretrained instead"
        )
    image = PretrainedTower(model.vision_model, getattr(model, "visual_projection", None), "image")
    text = PretrainedTower(model.text_model, getattr(model, "text_projection", None), "text")
    # The classifier's contrastive temperature starts from the checkpoint's; a saved model
    # rebuilds both towers from the checkpoint's whole config.
    image.logit_scale_init = checkpoint_logit_scale(model)
    image.dual_config = text.dual_config = model.config
    return image, text, model


def rebuild_dual(config: dict[str, Any]) -> tuple[Any, Any, nn.Module]:
    """Towers of a dual encoder freshly initialised from its saved config (weights come after)."""
    from transformers import AutoConfig, AutoModel

    spec = dict(config)
    model = AutoModel.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    return split_dual(model)


def checkpoint_logit_scale(model: nn.Module) -> torch.Tensor | None:
    """The checkpoint's learned contrastive temperature (log scale), if it has one."""
    scale = getattr(model, "logit_scale", None)
    return scale.detach().clone().reshape(()) if isinstance(scale, torch.Tensor) else None


# Text towers that pool their last position rather than the end-of-text token: trained on texts
# padded to their full length, so shorter padding would move each text's embedding with the
# longest text of its batch.
LAST_POSITION_POOLING = frozenset({"siglip_text_model", "siglip2_text_model"})


def with_text_padding(config: ModelConfig) -> ModelConfig:
    """`model.text_padding: auto` made concrete: `max_length` at the checkpoint's full length
    for a text tower that pools its last position (SigLIP), else `longest`."""
    if config.text_padding != "auto":
        return config
    named = config.checkpoint("text")
    if named is None:
        return padded_for(config, None)
    from transformers import AutoConfig

    loaded = from_pretrained(*named, AutoConfig.from_pretrained)
    return padded_for(config, getattr(loaded, "text_config", loaded))


def padded_for(config: ModelConfig, text_config: Any) -> ModelConfig:
    """`config` padding texts as the text tower of `text_config` (None: built from scratch)
    needs: to its full length if it pools its last position, else to the longest text."""
    length = None if text_config is None else fixed_text_length(text_config)
    if length is None:
        return replace(config, text_padding="longest")
    return replace(config, text_padding="max_length", max_text_length=length)


def fixed_text_length(text_config: Any) -> int | None:
    """The full text length of a text tower that pools its last position; None for others."""
    if getattr(text_config, "model_type", None) in LAST_POSITION_POOLING:
        return int(text_config.max_position_embeddings)
    return None
