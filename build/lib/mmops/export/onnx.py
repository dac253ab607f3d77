"""The classifier as served, exported to ONNX with a dynamic batch size and text length."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmops.export.attention import fused_attention, translation_table
from mmops.model.classifier import MultimodalClassifier, is_transformers
from mmops.model.preprocess import MODEL_INPUTS
from mmops.model.storage import LoadedModel

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("probs", "image_embeds", "text_embeds", "fused_embeds")


class ServingModel(nn.Module):
    """The classifier as served: class probabilities and the embeddings by modality."""

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
    ) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values, input_ids, attention_mask, image_present, text_present)
        embeds = out.embeddings()
        # In OUTPUT_NAMES order; the runner names them back by modality.
        return out.logits.float().softmax(-1), embeds["image"], embeds["text"], embeds["fused"]


def export_onnx(loaded: LoadedModel, batch: dict[str, torch.Tensor], path: Path) -> str:
    """The model as ONNX with a dynamic batch size and text length; says how attention went."""
    model = ServingModel(loaded.model.eval())
    args = tuple(torch.as_tensor(batch[name]) for name in MODEL_INPUTS)
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
    encoders = [m.config for m in (loaded.model.vision, loaded.model.text) if is_transformers(m)]
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


def _strip_metadata(path: Path) -> None:
    # The exporter annotates every node with its torch source; serving does not need ~1 MB of it.
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(model, str(path))
