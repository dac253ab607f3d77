"""One preprocessed example, as training, evaluation and serving pass it between stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Example:
    """An image's (3, H, W) float32 pixels (a numpy array or a torch tensor; None when absent),
    a text (or None) and a label index (-1 when unknown)."""

    pixels: Any | None
    text: str | None
    label: int
