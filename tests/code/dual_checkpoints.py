"""Dual-encoder checkpoints (CLIP, SigLIP) at tiny sizes with random weights, written with
save_pretrained beside a tokenizer trained on a few texts: what a hub checkpoint looks like,
without the hub."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

TEXTS = ["a red circle", "a blue square on the left", "two green triangles", "x"]


def tokenizer_for(folder: Path, texts: Sequence[str] = TEXTS) -> Any:
    from mmops.model.preprocess import train_tokenizer

    tokenizer = train_tokenizer(list(texts) * 10, 200, 16)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def clip_checkpoint(folder: Path, texts: Sequence[str] = TEXTS) -> Path:
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tokenizer_for(folder, texts)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
        # Pooled at the end-of-text token, as CLIP's own tokenizer marks it.
        "eos_token_id": tokenizer.sep_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    CLIPModel(config).save_pretrained(str(folder))
    return folder


def siglip_checkpoint(folder: Path, texts: Sequence[str] = TEXTS) -> Path:
    from transformers import SiglipConfig, SiglipModel

    tokenizer = tokenizer_for(folder, texts)
    shared = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    text = {**shared, "num_attention_heads": 2, "vocab_size": len(tokenizer)}
    text["max_position_embeddings"] = 16
    vision = {**shared, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(str(folder))
    return folder
