"""Streams that change part-way, for `mmops stream-demo --shift` and the drift benchmark.

Each shift acts on contract events (base64 image, text, and the true label as `truth`) and works
on any dataset: inverted images (an image-only shift), words of another vocabulary (text-only),
one event in ten with text of another vocabulary (a mixture: a new source among the old), and a
label prior moved to one class.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

SHIFTS = ("none", "image", "text", "mixture", "label")
# The modalities each shift moves; `label` moves the class mix, so every embedding.
MOVED = {"none": (), "image": ("image",), "text": ("text",), "mixture": ("text",), "label": ()}
MIXTURE_SHARE = 0.1
LABEL_SHARE = 0.7  # the favoured class's share of a label-prior shift
_SYLLABLES = ("ka", "lo", "mi", "ru", "ze", "po", "ta", "vu", "ni", "se", "go", "fa")


def invert_image(encoded: str) -> str:
    """A base64 image with its colours inverted, as PNG."""
    image = Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB")
    out = io.BytesIO()
    ImageOps.invert(image).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def foreign_word(word: str) -> str:
    """A word of another vocabulary: the same word always becomes the same syllables."""
    digest = hashlib.sha256(word.lower().encode()).digest()
    return "".join(_SYLLABLES[b % len(_SYLLABLES)] for b in digest[: 2 + digest[-1] % 3])


def foreign_text(text: str) -> str:
    return " ".join(foreign_word(word) for word in text.split())


def shift_event(event: Mapping[str, Any], modality: str) -> dict[str, Any]:
    """`event` with its image or its text moved; an absent one stays absent."""
    out = dict(event)
    if modality == "image" and out.get("image"):
        out["image"] = invert_image(out["image"])
    elif modality == "text" and out.get("text"):
        out["text"] = foreign_text(out["text"])
    return out


def shifted_stream(
    events: Sequence[Mapping[str, Any]], kind: str, after: int, n: int, seed: int = 0
) -> list[dict[str, Any]]:
    """`n` events drawn (with replacement, in a seeded order) from `events`; from event `after`
    on they are shifted by `kind` (one of SHIFTS)."""
    if kind not in SHIFTS:
        raise ValueError(f"shift: must be one of {', '.join(SHIFTS)}, got {kind!r}")
    if not events:
        raise ValueError("shift: no events to draw from")
    rng = np.random.default_rng(seed)
    before = rng.integers(0, len(events), after)
    later = n - after
    if kind == "label":
        draws = _favour_one_label(events, later, rng)
    else:
        draws = rng.integers(0, len(events), later)
    stream = [dict(events[i]) for i in before]
    for i in draws:
        event = events[i]
        if kind in ("image", "text"):
            event = shift_event(event, kind)
        elif kind == "mixture" and rng.random() < MIXTURE_SHARE:
            event = shift_event(event, "text")
        stream.append(dict(event))
    for index, event in enumerate(stream):
        event["id"] = f"{event['id']}-{index}"  # drawn twice is two events
    return stream


def _favour_one_label(
    events: Sequence[Mapping[str, Any]], n: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices where the most common class makes up LABEL_SHARE, the rest as before."""
    labels = np.array([str(e.get("truth")) for e in events])
    values, counts = np.unique(labels, return_counts=True)
    if len(values) < 2:
        raise ValueError("shift label: the events need a `truth` with two classes or more")
    favoured = values[counts.argmax()]
    weights = np.where(labels == favoured, 0.0, 1.0)
    weights = (1 - LABEL_SHARE) * weights / weights.sum()
    weights[labels == favoured] = LABEL_SHARE / (labels == favoured).sum()
    return rng.choice(len(events), n, p=weights)
