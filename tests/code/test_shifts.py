"""The stream shifts of `mmops stream-demo --shift` and the drift benchmark (no services)."""

from __future__ import annotations

import base64
import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mmops.monitoring.shifts import MOVED, SHIFTS, foreign_text, shift_event, shifted_stream


def png(rgb: tuple[int, int, int]) -> str:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def pixels(encoded: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"))


EVENTS = [
    {"id": f"e{i}", "image": png((200, 30 * i, 10)), "text": f"a red shape {i}", "truth": t}
    for i, t in enumerate("aaabbc")
]


def test_each_event_shift_moves_only_its_modality_and_keeps_an_absent_one_absent() -> None:
    event = EVENTS[1]
    grey = pixels(shift_event(event, "image")["image"])
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    inverted = pixels(shift_event(event, "invert")["image"])
    assert (inverted.astype(int) + pixels(event["image"]) == 255).all()
    moved = shift_event(event, "text")
    assert moved["image"] == event["image"] and moved["text"] != event["text"]
    assert moved["text"] == foreign_text(event["text"])  # the same words, the same syllables
    assert shift_event({"id": "x", "text": None}, "text") == {"id": "x", "text": None}
    for kind in ("image", "invert"):
        assert shift_event(event, kind)["text"] == event["text"]
    assert set(MOVED) == set(SHIFTS)


def test_a_stream_changes_at_its_point_and_a_label_shift_favours_one_class() -> None:
    stream = shifted_stream(EVENTS, "text", 50, 200, seed=1)
    assert len(stream) == 200 and len({e["id"] for e in stream}) == 200
    originals = {e["text"] for e in EVENTS}
    assert all(e["text"] in originals for e in stream[:50])
    assert not any(e["text"] in originals for e in stream[50:])
    labels = Counter(e["truth"] for e in shifted_stream(EVENTS, "label", 0, 2000, seed=2))
    assert labels["a"] / 2000 == pytest.approx(0.7, abs=0.04)
    mixed = shifted_stream(EVENTS, "mixture", 0, 2000, seed=3)
    assert sum(e["text"] not in originals for e in mixed) / 2000 == pytest.approx(0.1, abs=0.03)
    assert shifted_stream(EVENTS, "none", 10, 20, seed=1) == shifted_stream(
        EVENTS, "none", 10, 20, seed=1
    )
    with pytest.raises(ValueError, match="shift: must be one of"):
        shifted_stream(EVENTS, "sideways", 0, 10)
