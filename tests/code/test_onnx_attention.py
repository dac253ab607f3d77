from __future__ import annotations

import pytest
import torch

from mmops.config import load_params
from mmops.export.attention import IMPLEMENTATION, FusedMultiheadAttention, fused_attention
from mmops.model.classifier import MultimodalClassifier, build_encoders

VOCAB = 40


# The attention this routes: transformers encoders and the cross-attention fusion.
WITH_ATTENTION = ("model.vision.arch=vit", "model.text.arch=bert", "model.fusion=cross_attention")


def tiny_model(overrides: tuple[str, ...]) -> MultimodalClassifier:
    config = load_params(None, [*overrides, *WITH_ATTENTION]).model
    torch.manual_seed(0)
    vision, text = build_encoders(config, VOCAB)
    return MultimodalClassifier(config, 3, vision, text).eval()


def padded_batch(image_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    return {
        "pixel_values": torch.rand(4, 3, image_size, image_size, generator=generator) * 2 - 1,
        "input_ids": torch.randint(5, VOCAB, (4, 9), generator=generator) * mask,
        "attention_mask": mask,
        "image_present": torch.tensor([True, True, False, True]),
        "text_present": torch.tensor([True, False, True, True]),
    }


def test_fused_attention_computes_what_the_model_computes(tiny_overrides: tuple[str, ...]) -> None:
    model = tiny_model(tiny_overrides)
    batch = padded_batch(model.config.image_size)

    with torch.no_grad():
        plain = model(**batch)
        with fused_attention(model):
            layer = model.fusion.layers[0]
            routed = isinstance(layer.self_attn, FusedMultiheadAttention) and isinstance(
                layer.multihead_attn, FusedMultiheadAttention
            )
            implementation = model.text.config._attn_implementation
            fused = model(**batch)
        after = model(**batch)

    assert routed and implementation == IMPLEMENTATION
    torch.testing.assert_close(fused.logits, plain.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused.text_embeds, plain.text_embeds, atol=1e-5, rtol=1e-4)
    # The block restores the model: the same modules and attention implementation as before.
    assert isinstance(model.fusion.layers[0].self_attn, torch.nn.MultiheadAttention)
    assert model.text.config._attn_implementation != IMPLEMENTATION
    torch.testing.assert_close(after.logits, plain.logits)


def test_padding_does_not_reach_the_fused_attention(tiny_overrides: tuple[str, ...]) -> None:
    model = tiny_model(tiny_overrides)
    batch = padded_batch(model.config.image_size)
    # Change only padded token ids: a fused path that attended to padding would change too.
    noisy = {**batch, "input_ids": batch["input_ids"].where(batch["attention_mask"] == 1, 7)}

    with torch.no_grad(), fused_attention(model):
        clean, dirty = model(**batch).logits, model(**noisy).logits

    torch.testing.assert_close(dirty, clean, atol=1e-5, rtol=1e-4)


def test_fused_attention_refuses_masks_it_does_not_implement(
    tiny_overrides: tuple[str, ...],
) -> None:
    attention = FusedMultiheadAttention(torch.nn.MultiheadAttention(8, 2, batch_first=True))
    x = torch.rand(2, 3, 8)
    with pytest.raises(NotImplementedError, match="key padding"):
        attention(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.bool))
