"""Examples to the model's input arrays with numpy and `tokenizers` alone: the serving collator.

It gives the arrays training's collator (`mmops.model.preprocess.Collator`, torch and
transformers) gives, bit for bit: the same image arithmetic (`ImageSpec.array`) and the same
tokenizer with the same options (`mmops.model.text_processing`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmops.model.example import Example
from mmops.model.image_processing import ImageSpec
from mmops.model.text_processing import TextEncoder

log = logging.getLogger(__name__)

Tokenize = Callable[[Sequence[str]], dict[str, np.ndarray]]


class ArrayCollator:
    """Batches examples as the model's named input arrays (and `labels`)."""

    def __init__(self, tokenize: Tokenize, spec: ImageSpec) -> None:
        self.tokenize = tokenize
        self.spec = spec
        self.blank = spec.array(None)

    def __call__(self, examples: Sequence[Example]) -> dict[str, np.ndarray]:
        tokens = self.tokenize([e.text or "" for e in examples])
        pixels = [self.blank if e.pixels is None else np.asarray(e.pixels) for e in examples]
        height, width = self.spec.shape
        return {
            "pixel_values": (
                np.stack(pixels) if pixels else np.zeros((0, 3, height, width), np.float32)
            ),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "image_present": np.array([e.pixels is not None for e in examples], dtype=bool),
            "text_present": np.array([e.text is not None for e in examples], dtype=bool),
            "labels": np.array([e.label for e in examples], dtype=np.int64),
        }


def text_encoder(folder: Path, max_length: int, padding: str) -> Tokenize:
    """The model folder's tokenizer as training called it (`model.text_padding`: `max_length`
    pads every text to max_length, else to the batch's longest): with `tokenizers` alone, or
    for a tokenizer saved without tokenizer.json, through transformers (the training install)."""
    pad_to_max = padding == "max_length"
    try:
        return TextEncoder.from_folder(folder, max_length, pad_to_max)
    except FileNotFoundError:
        pass
    log.info("%s: no tokenizer.json; tokenizing through transformers", folder)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))

    def tokenize(texts: Sequence[str]) -> dict[str, Any]:
        tokens = tokenizer(
            list(texts),
            padding="max_length" if pad_to_max else True,
            truncation=True,
            max_length=max_length,
            return_attention_mask=True,
            return_tensors="np",
        )
        return {k: np.asarray(tokens[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}

    return tokenize
