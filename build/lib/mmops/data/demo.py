"""Deterministic synthetic image + text dataset whose labels need both modalities.

Each image shows one shape with a colour, a kind and a size; each text asks about one of those
attributes, and the label is the answer. The image alone does not say which attribute is asked,
and the text alone does not say what the shape looks like.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 45, 40),
    "green": (45, 165, 70),
    "blue": (45, 85, 215),
    "yellow": (225, 195, 45),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES}
QUESTIONS = {
    "colour": (
        "What colour is the {noun}?",
        "Which color does the {noun} have?",
        "Name the colour of the {noun}.",
        "what color is the {noun}",
    ),
    "shape": (
        "What shape is the {noun}?",
        "Which shape is drawn?",
        "Name the shape of the {noun}.",
        "what kind of shape is the {noun}",
    ),
    "size": (
        "Is the {noun} small or large?",
        "How big is the {noun}?",
        "What size is the {noun}?",
        "is the {noun} big or little",
    ),
}
NOUNS = ("shape", "object", "figure", "thing")
PREFIXES = ("", "Look at the picture. ", "Quick question: ", "Please answer: ")
# Field photos are noisier and have textured backgrounds: a slice for per-group metrics.
GROUPS = {"studio": 0.7, "field": 0.3}
CARD_NAME = "dataset.json"
GENERATOR = "mmops demo-data"
_PARALLEL_FROM = 4000


@dataclass(frozen=True)
class DemoExample:
    id: str
    colour: str
    shape: str
    size: str
    asked: str
    text: str
    group: str

    @property
    def label(self) -> str:
        return {"colour": self.colour, "shape": self.shape, "size": self.size}[self.asked]

    @property
    def image(self) -> str:
        # Shard folders keep directory listings fast at 100k images.
        return f"images/{int(self.id.rsplit('-', 1)[1]) // 1000:03d}/{self.id}.png"


def sample_example(index: int, seed: int) -> DemoExample:
    """The latent attributes of example `index`; the same for any worker count or chunking."""
    rng = np.random.default_rng((seed, index, 0))
    asked = str(rng.choice(list(ATTRIBUTES)))
    template = str(rng.choice(QUESTIONS[asked]))
    text = str(rng.choice(PREFIXES)) + template.format(noun=rng.choice(NOUNS))
    return DemoExample(
        id=f"demo-{index:06d}",
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        size=str(rng.choice(SIZES)),
        asked=asked,
        text=text,
        group=str(rng.choice(list(GROUPS), p=list(GROUPS.values()))),
    )


def render(example: DemoExample, index: int, seed: int, image_size: int) -> Image.Image:
    """Draw the example's shape at a random position on a noisy background."""
    rng = np.random.default_rng((seed, index, 1))
    s = image_size
    field = example.group == "field"
    base = rng.integers(90, 170)
    background = np.full((s, s, 3), base, dtype=np.float32) + rng.normal(0, 6, 3)
    if field:
        xx = np.arange(s)[None, :]
        background += 25 * np.sin(xx / rng.uniform(3, 8) + rng.uniform(0, 6))[..., None]
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    radius = s * (rng.uniform(0.13, 0.17) if example.size == "small" else rng.uniform(0.27, 0.33))
    cx, cy = rng.uniform(radius + 1, s - radius - 1, size=2)
    colour = tuple(
        int(c) for c in np.clip(np.array(COLOURS[example.colour]) + rng.normal(0, 12, 3), 0, 255)
    )
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    draw = ImageDraw.Draw(image)
    if example.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif example.shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon(
            [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour
        )
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 16 if field else 6, (s, s, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_examples(out_dir: str, start: int, stop: int, seed: int, image_size: int) -> list[dict]:
    """Render examples [start, stop) into `out_dir` and return their manifest records."""
    records = []
    for index in range(start, stop):
        example = sample_example(index, seed)
        path = Path(out_dir) / example.image
        path.parent.mkdir(parents=True, exist_ok=True)
        render(example, index, seed, image_size).save(path, format="PNG", compress_level=1)
        records.append(
            {
                "id": example.id,
                "image": example.image,
                "text": example.text,
                "label": example.label,
                "group": example.group,
            }
        )
    return records


def make_demo_data(
    out_dir: Path | str, n: int = 2000, seed: int = 0, image_size: int = 64, workers: int = 0
) -> Path:
    """Write a demo dataset of `n` examples to `out_dir` and return its manifest path."""
    out = Path(out_dir)
    clear_generated(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    if n < _PARALLEL_FROM or workers == 1:
        records = write_examples(str(out), 0, n, seed, image_size)
    else:
        bounds = np.linspace(0, n, workers * 4 + 1).astype(int).tolist()
        starts, stops = bounds[:-1], bounds[1:]
        k = len(starts)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            chunks = pool.map(
                write_examples, [str(out)] * k, starts, stops, [seed] * k, [image_size] * k
            )
            records = [record for chunk in chunks for record in chunk]
    manifest = out / "manifest.jsonl"
    with manifest.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    card = {"generator": GENERATOR, "n": n, "seed": seed, "image_size": image_size}
    (out / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return manifest


def clear_generated(out: Path, generator: str = GENERATOR) -> None:
    """Remove a dataset `generator` wrote earlier; refuse a directory that holds anything else."""
    if not out.exists() or not any(out.iterdir()):
        return
    card = out / CARD_NAME
    try:
        ours = json.loads(card.read_text()).get("generator") == generator
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise FileExistsError(
            f"{out}: not empty and not a dataset `{generator}` wrote; refusing to overwrite"
        )
    shutil.rmtree(out / "images", ignore_errors=True)
    for name in ("manifest.jsonl", CARD_NAME):
        (out / name).unlink(missing_ok=True)
