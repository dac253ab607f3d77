"""Drawing for the synthetic dataset families: backgrounds, shapes, glyphs and natural textures."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
COLOUR_NAMES = {
    "red": (210, 45, 40),
    "green": (40, 160, 70),
    "blue": (45, 80, 210),
    "yellow": (225, 195, 45),
}
TEXTURES = ("marble", "wood", "clouds", "cells", "fabric")
# A 5x7 bitmap digit font: a glyph's identity survives jitter, rotation and thickness changes.
_FONT = {
    0: ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    1: ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    2: ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    3: ("11110", "00001", "00001", "01110", "00001", "00001", "11110"),
    4: ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    5: ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    6: ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    7: ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    8: ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    9: ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}


def random_colour(rng: np.random.Generator, low: int = 30, high: int = 230) -> np.ndarray:
    return rng.integers(low, high, 3).astype(np.float32)


def background(rng: np.random.Generator, size: int, clutter: bool = True) -> Image.Image:
    """A muted background with a gentle gradient and, optionally, a few distracting lines."""
    base = rng.uniform(60, 190) + rng.normal(0, 20, 3)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    pixels = base[None, None, :] + rng.uniform(5, 30) * gradient[..., None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if clutter:
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(0, 3))):
            ends = [tuple(float(v) for v in rng.uniform(0, size, 2)) for _ in range(2)]
            fill = tuple(int(v) for v in base + rng.normal(0, 35, 3))
            draw.line(ends, fill=fill, width=int(rng.integers(1, 3)))
    return image


def finish(image: Image.Image, rng: np.random.Generator, noise: float) -> Image.Image:
    """Pixel noise over the whole picture, as a camera or scanner would add."""
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0, noise, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    turns = angle + np.linspace(0, 2 * np.pi, len(radii), endpoint=False) - np.pi / 2
    return [
        (cx + r * float(np.cos(t)), cy + r * float(np.sin(t)))
        for r, t in zip(radii, turns, strict=True)
    ]


def _cross(cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    r, w = radius, radius * 0.35
    corners = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r)]
    corners += [(-a, -b) for a, b in corners]
    c, s = float(np.cos(angle)), float(np.sin(angle))
    return [(cx + a * c - b * s, cy + a * s + b * c) for a, b in corners]


def draw_shape(
    image: Image.Image,
    kind: str,
    centre: tuple[float, float],
    radius: float,
    colour: np.ndarray,
    angle: float = 0.0,
) -> None:
    """Draw one filled shape of `kind` (see SHAPES), turned by `angle` radians, in place."""
    draw = ImageDraw.Draw(image)
    fill = tuple(int(c) for c in np.clip(colour, 0, 255))
    cx, cy = centre
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "ring":
        draw.ellipse(box, outline=fill, width=max(2, round(radius * 0.35)))
    elif kind == "square":
        draw.polygon(_polygon(cx, cy, [radius * 1.2] * 4, angle + np.pi / 4), fill=fill)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy, [radius * 1.15] * 3, angle), fill=fill)
    elif kind == "star":
        draw.polygon(_polygon(cx, cy, [radius * 1.15, radius * 0.5] * 5, angle), fill=fill)
    elif kind == "cross":
        draw.polygon(_cross(cx, cy, radius, angle), fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}; one of {', '.join(SHAPES)}")


def draw_glyph(
    image: Image.Image,
    digit: int,
    rng: np.random.Generator,
    colour: np.ndarray,
    max_degrees: float = 15.0,
) -> None:
    """Paste digit `digit` from the bitmap font at a jittered position, scale, angle and weight."""
    size = image.size[0]
    cell = np.kron(np.array([[c == "1" for c in row] for row in _FONT[digit]]), np.ones((4, 4)))
    mask = Image.fromarray((np.pad(cell, 4) * 255).astype(np.uint8))
    if rng.random() < 0.5:
        mask = mask.filter(ImageFilter.MaxFilter(3 if rng.random() < 0.7 else 5))
    height = int(size * rng.uniform(0.45, 0.7))
    mask = mask.resize((max(4, int(height * mask.width / mask.height)), height), Image.BILINEAR)
    mask = mask.rotate(float(rng.uniform(-max_degrees, max_degrees)), Image.BILINEAR, expand=True)
    x = int(rng.integers(0, max(1, size - mask.width)))
    y = int(rng.integers(0, max(1, size - mask.height)))
    fill = Image.new("RGB", mask.size, tuple(int(c) for c in colour))
    image.paste(fill, (x, y), mask)


def distinct_colour(rng: np.random.Generator, image: Image.Image) -> np.ndarray:
    """A random colour far enough from the background's mean to stay visible."""
    mean = np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0)
    for _ in range(20):
        colour = random_colour(rng)
        if np.abs(colour - mean).sum() > 150:
            return colour
    return 255 - mean


def shape_scene(
    rng: np.random.Generator, size: int, kind: str, colour: np.ndarray | None
) -> Image.Image:
    image = background(rng, size)
    radius = size * rng.uniform(0.18, 0.32)
    centre = tuple(float(v) for v in rng.uniform(radius, size - radius, 2))
    fill = distinct_colour(rng, image) if colour is None else colour + rng.normal(0, 12, 3)
    draw_shape(image, kind, centre, radius, fill, float(rng.uniform(-0.35, 0.35)))
    return finish(image, rng, rng.uniform(4, 14))


def two_shapes_scene(
    rng: np.random.Generator, size: int, left: tuple[str, str], right: tuple[str, str]
) -> Image.Image:
    """Two shapes side by side, each (kind, colour name), jittered in place and size."""
    image = background(rng, size)
    for (kind, colour), x0 in ((left, 0.0), (right, size / 2)):
        radius = size * rng.uniform(0.1, 0.17)
        cx = x0 + rng.uniform(radius + 1, size / 2 - radius - 1)
        cy = rng.uniform(radius + 1, size - radius - 1)
        fill = np.array(COLOUR_NAMES[colour], dtype=np.float32) + rng.normal(0, 12, 3)
        draw_shape(image, kind, (float(cx), float(cy)), radius, fill, float(rng.uniform(-0.3, 0.3)))
    return finish(image, rng, rng.uniform(4, 12))


def smooth_noise(rng: np.random.Generator, size: int, cells: float) -> np.ndarray:
    """Value noise: a coarse random grid, smoothly interpolated (an octave of Perlin-like noise)."""
    grid = max(2, round(cells)) + 1
    coarse = Image.fromarray(rng.random((grid, grid)).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float32)


def fractal_noise(
    rng: np.random.Generator, size: int, cells: float, octaves: int = 3
) -> np.ndarray:
    """Octaves of value noise, each twice as fine and half as strong: cloud- or stone-like."""
    total = np.zeros((size, size), dtype=np.float32)
    for octave in range(octaves):
        total += smooth_noise(rng, size, cells * 2**octave) / 2**octave
    return total / (2 - 2 ** (1 - octaves))


def texture_field(kind: str, rng: np.random.Generator, size: int, fine: bool) -> np.ndarray:
    """A texture of `kind` (see TEXTURES) as values in 0..1; `fine` makes its grain ~2.3x finer."""
    scale = rng.uniform(0.85, 1.15) * (2.3 if fine else 1.0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, np.pi)
    if kind == "marble":
        turbulence = fractal_noise(rng, size, 3)
        field = np.sin(
            2 * np.pi * 2.5 * scale * (x * np.cos(angle) + y * np.sin(angle)) + 6 * turbulence
        )
    elif kind == "wood":
        cx, cy = rng.uniform(-0.3, 1.3, 2)
        radius = np.hypot(x - cx, (y - cy) * rng.uniform(0.3, 0.7))
        field = np.sin(2 * np.pi * 5 * scale * radius + 2.5 * fractal_noise(rng, size, 2))
    elif kind == "clouds":
        field = fractal_noise(rng, size, 2.5 * scale, octaves=4)
    elif kind == "cells":
        points = rng.random((int(7 * scale**2), 2)).astype(np.float32)
        distances = np.hypot(x[..., None] - points[:, 0], y[..., None] - points[:, 1])
        field = distances.min(axis=-1)
    elif kind == "fabric":
        u = x * np.cos(angle) + y * np.sin(angle)
        v = -x * np.sin(angle) + y * np.cos(angle)
        f = 2 * np.pi * 4 * scale
        field = np.sin(f * u) * np.sin(f * v) + 0.4 * fractal_noise(rng, size, 4)
    else:
        raise ValueError(f"unknown texture {kind!r}; one of {', '.join(TEXTURES)}")
    low, high = float(field.min()), float(field.max())
    return (field - low) / max(high - low, 1e-6)


def colourise(field: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Map a 0..1 field onto a random two-colour palette, so colour says nothing of the kind."""
    dark, light = random_colour(rng, 10, 120), random_colour(rng, 130, 250)
    pixels = dark + field[..., None] * (light - dark)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
