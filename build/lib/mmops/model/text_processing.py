"""Tokenization as training does it, with the `tokenizers` library alone (no transformers).

A saved model's tokenizer folder holds `tokenizer.json` (the whole pipeline: normaliser,
pre-tokenizer, model, post-processor) and `tokenizer_config.json` (pad token, sides). Training
calls the transformers tokenizer with truncation to `max_length` and padding to the longest text
or to `max_length`; transformers sets exactly those options on this same `tokenizers` object and
calls `encode_batch`, so `TextEncoder` gives the same ids and masks bit for bit
(tests/code/test_text_processing.py checks it on WordPiece, BPE and Unigram tokenizers).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SIDES = ("right", "left")


class TextEncoder:
    """Texts to `input_ids` and `attention_mask` (int64, (n, length)) as the model trained:
    truncated to `max_length`, padded to the longest text or, with `pad_to_max`, to
    `max_length`. Its options are set once, so threads may share it."""

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        pad_to_max: bool,
        pad_token: str,
        sides: tuple[str, str] = ("right", "right"),
    ) -> None:
        padding_side, truncation_side = sides
        if padding_side not in SIDES or truncation_side not in SIDES:
            raise ValueError(f"tokenizer: padding and truncation sides must be in {SIDES}")
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"tokenizer: pad token {pad_token!r} is not in the vocabulary")
        # The options transformers' fast tokenizer sets before it encodes a batch.
        tokenizer.enable_truncation(
            max_length, stride=0, strategy="longest_first", direction=truncation_side
        )
        tokenizer.enable_padding(
            direction=padding_side,
            pad_id=pad_id,
            pad_type_id=0,
            pad_token=pad_token,
            length=max_length if pad_to_max else None,
        )
        self.tokenizer = tokenizer
        self.width = max_length if pad_to_max else 0  # of an empty batch

    @classmethod
    def from_folder(cls, folder: Path | str, max_length: int, pad_to_max: bool) -> TextEncoder:
        """The tokenizer a model folder saved; FileNotFoundError without its tokenizer.json."""
        from tokenizers import Tokenizer

        folder = Path(folder)
        if not (folder / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"{folder}: no {TOKENIZER_FILE} (a slow-only tokenizer)")
        config_path = folder / CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        pad = _token(config.get("pad_token"))
        if pad is None:
            raise ValueError(f"{config_path}: no pad_token, so batches cannot be padded")
        sides = (config.get("padding_side", "right"), config.get("truncation_side", "right"))
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        return cls(tokenizer, max_length, pad_to_max, pad, sides)

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        if not encodings:
            empty = np.zeros((0, self.width), dtype=np.int64)
            return {"input_ids": empty, "attention_mask": empty.copy()}
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json holds it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
