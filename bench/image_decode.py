"""Reduced-size JPEG decoding vs a full decode: time to the model's tensor, and the difference.

For photo-like JPEGs (1/f noise in correlated colours, sharp shapes, sensor grain; quality 90) of
4000x3000 and 1024x768 pixels, and the specs of a CLIP (shortest edge 224 bicubic, centre crop
224), a SigLIP (224x224 bicubic), and the mmops default (bilinear, pixels to [-1, 1]) at 224 and
at 64 (`model.image_size`'s default): the time from the encoded bytes to the model's tensor
through `open_image` and `image_tensor` with the spec (libjpeg decodes at 1/2 to 1/8 scale,
keeping DRAFT_FACTOR times the resize's size) and without it (the full decode), alternating in
the same run, medians of `--repeats`; the max and mean absolute difference of the two tensors,
in pixel levels (0-255) and in the model's units; and, for scale, the same difference between
the full decode's tensor and the original image's (what JPEG itself changes). `--factors` also
measures other draft factors (1 lets libjpeg go down to the resize's own size).

Prints one JSON line:

    python bench/image_decode.py [--repeats 9] [--factors 1,2,3] [--sizes 4000x3000,2000x1500]
"""

from __future__ import annotations

import argparse
import io
import json
import time
from statistics import median
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

import mmops.model.image_processing as image_processing
from mmops.model.image_processing import DRAFT_FACTOR, ImageSpec
from mmops.model.preprocess import image_tensor, open_image

SIZES = "4000x3000,1024x768"
SPECS = {
    "clip": ImageSpec(
        shortest_edge=224,
        crop=(224, 224),
        mean=(0.48145466, 0.4578275, 0.40821073),
        std=(0.26862954, 0.26130258, 0.27577711),
        resample="bicubic",
    ),
    "siglip": ImageSpec(size=(224, 224), resample="bicubic"),
    "default": ImageSpec.default(224),
    "default64": ImageSpec.default(64),
}


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """An image with a photo's statistics: detail at every scale, edges, grain."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    falloff = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(width, height))
    mix = rng.normal(size=(3, 3)) * 0.4 + np.eye(3)  # channels correlate, as in a photo
    planes = []
    for _ in range(3):
        spectrum = falloff * (rng.normal(size=falloff.shape) + 1j * rng.normal(size=falloff.shape))
        plane = np.fft.irfft2(spectrum, s=(height, width))
        planes.append(plane / plane.std())
    field = np.tensordot(mix, np.stack(planes), axes=1)
    pixels = np.clip(128 + 40 * field.transpose(1, 2, 0), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(width // 50, width // 8))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            draw.line((x - r, y, x + r, y + r // 2), fill=colour, width=max(1, r // 20))
    grain = rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + grain, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def to_tensor(data: bytes, spec: ImageSpec, factor: int | None) -> tuple[float, Any]:
    """Seconds from bytes to tensor, and the tensor: a full decode, or a draft at `factor`."""
    image_processing.DRAFT_FACTOR = factor or DRAFT_FACTOR
    try:
        start = time.perf_counter()
        tensor = image_tensor(open_image(data, spec=spec if factor else None), spec)
        return time.perf_counter() - start, tensor
    finally:
        image_processing.DRAFT_FACTOR = DRAFT_FACTOR


def compare(
    original: Image.Image, data: bytes, spec: ImageSpec, repeats: int, factors: list[int]
) -> dict[str, Any]:
    """Full decode and drafts at each factor, timed in alternation, and their differences."""
    times: dict[int | None, list[float]] = {f: [] for f in [None, *factors]}
    tensors: dict[int | None, Any] = {}
    for _ in range(repeats):
        for factor in times:
            seconds, tensors[factor] = to_tensor(data, spec, factor)
            times[factor].append(seconds)
    full_ms = median(times[None]) * 1000
    levels = np.asarray(spec.std, dtype=np.float32)[:, None, None] / spec.rescale
    jpeg_error = (tensors[None] - image_tensor(original, spec)).abs().numpy() * levels
    row: dict[str, Any] = {
        "full_ms": round(full_ms, 2),
        "jpeg_max_abs_levels": round(float(jpeg_error.max()), 2),
        "jpeg_mean_abs_levels": round(float(jpeg_error.mean()), 3),
    }
    for factor in factors:
        image_processing.DRAFT_FACTOR = factor
        decoded = open_image(data, spec=spec).size
        image_processing.DRAFT_FACTOR = DRAFT_FACTOR
        diff = (tensors[factor] - tensors[None]).abs().numpy()
        draft_ms = median(times[factor]) * 1000
        row[f"draft{factor}"] = {
            "decoded": f"{decoded[0]}x{decoded[1]}",
            "ms": round(draft_ms, 2),
            "speedup": round(full_ms / draft_ms, 2),
            "max_abs_levels": round(float((diff * levels).max()), 2),
            "mean_abs_levels": round(float((diff * levels).mean()), 3),
            "max_abs": round(float(diff.max()), 4),
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--factors", default=str(DRAFT_FACTOR), help="draft factors, e.g. 1,2,4")
    parser.add_argument("--sizes", default=SIZES, help="JPEG sizes, WxH, comma-separated")
    args = parser.parse_args()
    factors = [int(f) for f in args.factors.split(",")]
    sizes = [tuple(map(int, size.split("x"))) for size in args.sizes.split(",")]
    result: dict[str, Any] = {"draft_factor": DRAFT_FACTOR}
    for width, height in sizes:
        original = photo_like(width, height)
        data = jpeg(original)
        for name, spec in SPECS.items():
            key = f"{width}x{height}/{name}"
            result[key] = compare(original, data, spec, args.repeats, factors)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
