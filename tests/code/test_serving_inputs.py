"""What serving accepts from a caller: image bytes of the formats training accepts, never a path."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from mmops.config import IMAGE_FORMATS, Params
from mmops.data.images import inspect_image
from mmops.model.preprocess import open_image
from mmops.serving.predictor import Predictor
from mmops.tracking.pyfunc import MmopsPyfunc

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "MPO")


def encoded(fmt: str, size: int = 20) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (size, size), (200, 30, 90))
    if fmt == "MPO":  # a multi-picture JPEG, as phone cameras write
        image.save(buffer, format="MPO", save_all=True, append_images=[image])
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_dir(untrained_model_dir: Path) -> Path:
    return untrained_model_dir


@pytest.fixture(scope="module")
def pyfunc(model_dir: Path) -> MmopsPyfunc:
    model = MmopsPyfunc()
    model.load(model_dir)
    return model


def test_the_pyfunc_refuses_image_paths_inside_and_outside_the_working_directory(
    pyfunc: MmopsPyfunc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    for folder in (work, elsewhere):
        folder.mkdir()
        (folder / "x.png").write_bytes(encoded("PNG"))
    monkeypatch.chdir(work)
    png = encoded("PNG")
    frame = pd.DataFrame(
        {
            "id": ["relative", "absolute", "dotdot", "bytes", "base64"],
            "text": ["a red circle"] * 5,
            "image": [
                "x.png",
                str(elsewhere / "x.png"),
                "../elsewhere/x.png",
                png,
                base64.b64encode(png).decode(),
            ],
        }
    )

    out = pyfunc.predict(None, frame).set_index("id")

    for refused in ("relative", "absolute", "dotdot"):
        assert out.loc[refused, "label"] == ""
        assert "path" in out.loc[refused, "error"], out.loc[refused, "error"]
    for served in ("bytes", "base64"):
        assert out.loc[served, "error"] == ""
        assert out.loc[served, "label"] in {"a", "b", "c"}


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP", "MPO"])
def test_serving_refuses_an_image_format_training_does_not_accept(
    pyfunc: MmopsPyfunc, fmt: str
) -> None:
    predictor: Predictor = pyfunc.predictor
    records = [
        {"id": "other", "text": "t", "image": base64.b64encode(encoded(fmt)).decode()},
        {"id": "png", "text": "t", "image": encoded("PNG")},
        {"id": "jpeg", "text": "t", "image": encoded("JPEG")},
    ]

    other, png, jpeg = predictor.predict_batch(records)

    assert other["reason"] == "image_undecodable"
    assert "PNG or JPEG" in other["error"] and "label" not in other
    assert png["label"] and jpeg["label"] and "error" not in png and "error" not in jpeg


@pytest.mark.parametrize("fmt", FORMATS)
def test_validation_and_serving_accept_the_same_formats(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(encoded(fmt))
    validated = inspect_image(str(tmp_path), path.name, Params().validate.image).problem is None
    try:
        open_image(path.read_bytes())
        served = True
    except UnidentifiedImageError:
        served = False
    assert validated == served == (fmt in IMAGE_FORMATS)


def test_an_image_file_of_another_format_is_named_when_refused(tmp_path: Path) -> None:
    path = tmp_path / "frame.gif"
    path.write_bytes(encoded("GIF"))
    with pytest.raises(UnidentifiedImageError, match="PNG or JPEG") as info:
        open_image(path)
    assert str(path) in str(info.value)


def test_a_latency_figure_stops_at_its_time_budget_but_keeps_three_timings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow model (a ViT-B/32 at batch 32: seconds a call) is timed a few times, not
    `repeats` times; a fast one gets every repeat."""
    import time

    from mmops.serving import runners

    calls: list[int] = []

    def slow(batch: object) -> None:
        calls.append(1)
        time.sleep(0.03)

    monkeypatch.setattr(runners, "LATENCY_BUDGET_S", 0.1)
    batch = {"pixel_values": torch.zeros(2, 3, 4, 4)}
    figure = runners.measure_latency(slow, batch, repeats=100)
    assert runners.MIN_TIMINGS < len(calls) <= 3 + 6  # some warm-up, then the budget
    assert figure["p50_ms"] >= 30
    calls.clear()
    runners.measure_latency(lambda batch: calls.append(1), batch, repeats=10)
    assert len(calls) == 3 + 10
