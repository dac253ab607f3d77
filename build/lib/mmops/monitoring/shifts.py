"""Streams that change part-way, for `mmops stream-demo --shift` and the drift benchmark.

Each shift acts on contract events (base64 image, text, and the true label as `truth`) and works
on any dataset: images that lost their colour (`image`: a camera or pipeline change), inverted
images (`invert`; on data whose colours are a set closed under inversion, such as the demo's
palette, it permutes the images among themselves, so no test on the image marginal sees it, and
only online accuracy does), words of another vocabulary (text-only), one event in ten with text
of another vocabulary (a mixture: a new source among the old), and a label prior moved to one
class.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

SHIFTS = ("none", "image", "invert", "text", "mixture", "label")
# The modalities each shift moves; `label` moves the class mix, so every embedding.
MOVED = {
    "none": (),
    "image": ("image",),
    "invert": ("image",),
    "text": ("text",),
    "mixture": ("text",),
    "label": (),
}
# How each per-event shift changes the event's field of that modality.
_EVENT_SHIFTS = {"image": "image", "invert": "image", "text": "text"}
MIXTURE_SHARE = 0.1
LABEL_SHARE = 0.7  # the favoured class's share of a label-prior shift
_SYLLABLES = ("ka", "lo", "mi", "ru", "ze", "po", "ta", "vu", "ni", "se", "go", "fa")


def _png(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def invert_image(encoded: str) -> str:
    """A base64 image with its colours inverted, as PNG."""
    return _png(ImageOps.invert(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB")))


def decolour_image(encoded: str) -> str:
    """A base64 image in greys (its luminance), as an RGB PNG: colour lost upstream."""
    image = Image.open(io.BytesIO(base64.b64decode(encoded))).convert("L").convert("RGB")
    return _png(image)


def foreign_word(word: str) -> str:
    """A word of another vocabulary: the same word always becomes the same syllables."""
    digest = hashlib.sha256(word.lower().encode()).digest()
    return "".join(_SYLLABLES[b % len(_SYLLABLES)] for b in digest[: 2 + digest[-1] % 3])


def foreign_text(text: str) -> str:
    return " ".join(foreign_word(word) for word in text.split())


def shift_event(event: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """`event` with its image (`image`: decoloured, `invert`: inverted) or its text (`text`)
    moved; an absent one stays absent."""
    out = dict(event)
    field = _EVENT_SHIFTS[kind]
    if out.get(field):
        change = {"image": decolour_image, "invert": invert_image, "text": foreign_text}[kind]
        out[field] = change(out[field])
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
        if kind in _EVENT_SHIFTS:
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
