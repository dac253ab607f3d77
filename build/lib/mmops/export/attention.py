"""Attention that exports as ONNX Runtime's fused `com.microsoft.MultiHeadAttention`.

Exported as plain ops, each attention block is a dozen nodes (head reshapes and transposes,
two MatMuls, scale, mask, softmax) that cost ONNX Runtime about a third of the model's time at
batch 32. During export the encoders and the fusion decoder route attention through one custom
op that the exporter writes as a single MultiHeadAttention node: the same arithmetic, the same
weights, and the torch model outside export is untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import onnxscript
import torch
import torch.nn.functional as F
from onnxscript import FLOAT
from torch import nn

from mmops.model.classifier import is_transformers

IMPLEMENTATION = "mmops_ort_mha"  # the transformers attention implementation names
UNMASKED = "mmops_ort_mha_unmasked"


@functools.cache
def custom_op() -> Any:
    """The op `mmops::multi_head_attention` (q, k, v as (batch, seq, hidden), additive bias)."""

    @torch.library.custom_op("mmops::multi_head_attention", mutates_args=())
    def multi_head_attention(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bias: torch.Tensor | None,
        num_heads: int,
        scale: float,
    ) -> torch.Tensor:
        batch, length = query.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch, x.shape[1], num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(query), heads(key), heads(value), attn_mask=bias, scale=scale
        )
        return out.transpose(1, 2).reshape(batch, length, -1)

    @multi_head_attention.register_fake
    def _(query, key, value, bias, num_heads, scale):
        return query.new_empty(query.shape[0], query.shape[1], value.shape[2])

    return multi_head_attention


# The ONNX side: one com.microsoft.MultiHeadAttention node (ONNX Runtime's contrib op set),
# written as onnxscript requires, at module level (it resolves names from the module).
_MSFT = onnxscript.values.Opset("com.microsoft", 1)


@onnxscript.script(_MSFT)
def _ort_multi_head_attention(
    query: FLOAT, key: FLOAT, value: FLOAT, bias: FLOAT | None, num_heads: int, scale: float
) -> FLOAT:
    return _MSFT.MultiHeadAttention(
        query, key, value, None, None, bias, num_heads=num_heads, scale=scale
    )


def translation_table() -> dict[Any, Any]:
    """For `torch.onnx.export(custom_translation_table=...)`: the op as one ONNX node."""
    custom_op()
    return {torch.ops.mmops.multi_head_attention.default: _ort_multi_head_attention}


def _attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: Any, heads: int, scale: float
) -> torch.Tensor:
    """(batch, seq, hidden) q, k, v through the op; `bias` is additive, None, or a keep-mask."""
    if bias is not None:
        if bias.dtype == torch.bool:
            bias = query.new_zeros(bias.shape).masked_fill(~bias, torch.finfo(query.dtype).min)
        # ONNX Runtime's MultiHeadAttention wants the bias as (batch, 1, queries, keys).
        bias = bias.to(query.dtype).expand(query.shape[0], 1, query.shape[1], key.shape[1])
    return custom_op()(query, key, value, bias, heads, float(scale))


def transformers_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: (batch, heads, seq, dim) in, (batch, seq, heads, dim)."""
    batch, heads, length, dim = query.shape

    def merge(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(batch, x.shape[2], heads * dim)

    scale = scaling if scaling is not None else dim**-0.5
    out = _attention(merge(query), merge(key), merge(value), attention_mask, heads, scale)
    return out.reshape(batch, length, heads, dim), None


class FusedMultiheadAttention(nn.Module):
    """Stands in for a batch-first `nn.MultiheadAttention` during export, on its own weights."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attention = attention
        self.batch_first = attention.batch_first  # nn.TransformerDecoder reads it

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        mha = self.attention
        if attn_mask is not None or is_causal:
            raise NotImplementedError("only key padding masks are supported")
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        keep = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        heads = mha.num_heads
        out = _attention(q, k, v, keep, heads, (mha.embed_dim // heads) ** -0.5)
        return mha.out_proj(out), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def fused_attention(model: nn.Module) -> Iterator[None]:
    """While the block runs, the classifier's attention goes through the fused op.

    `model` is a `MultimodalClassifier`: its encoders switch to this attention implementation
    and each fusion decoder layer's attention modules are stood in for.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name in (IMPLEMENTATION, UNMASKED):
        AttentionInterface.register(name, transformers_attention)
    # Text gets keep-masks as SDPA does. An image's patch grid has no padding, but a traced
    # encoder cannot prove its all-true mask away: the vision tower is told there is none.
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    AttentionMaskInterface.register(UNMASKED, _no_mask)
    # mmops's own encoders have no attention; only transformers encoders are switched.
    switched = [
        (encoder.config, implementation)
        for encoder, implementation in ((model.vision, UNMASKED), (model.text, IMPLEMENTATION))
        if is_transformers(encoder)
    ]
    configs = [config for config, _ in switched]
    previous = [getattr(c, "_attn_implementation", None) for c in configs]
    decoder = isinstance(model.fusion, nn.TransformerDecoder)
    layers = list(model.fusion.layers) if decoder else []
    originals = [(layer, layer.self_attn, layer.multihead_attn) for layer in layers]
    try:
        for config, implementation in switched:
            config._attn_implementation = implementation
        for layer, self_attn, cross_attn in originals:
            layer.self_attn = FusedMultiheadAttention(self_attn)
            layer.multihead_attn = FusedMultiheadAttention(cross_attn)
        yield
    finally:
        for config, implementation in zip(configs, previous, strict=True):
            config._attn_implementation = implementation
        for layer, self_attn, cross_attn in originals:
            layer.self_attn, layer.multihead_attn = self_attn, cross_attn
