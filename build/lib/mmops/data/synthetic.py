"""Synthetic dataset families of structures no default was tuned on, in the dataset contract.

Each family is one kind of structure (which modality carries the label, how many classes, how many
rows, how balanced, what the pictures look like); `write_family` writes one as a dataset that
`mmops validate` accepts with the default params. The same name, n, seed and size give the same
files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmops.data.demo import CARD_NAME, clear_generated
from mmops.data.synthetic_images import (
    COLOUR_NAMES,
    SHAPES,
    TEXTURES,
    background,
    colourise,
    distinct_colour,
    draw_glyph,
    finish,
    shape_scene,
    texture_field,
    two_shapes_scene,
)
from mmops.data.synthetic_texts import (
    ADD_TEMPLATES,
    BOX_TEMPLATES,
    BOXES,
    CAPTIONS,
    DIGIT_TEMPLATES,
    GENERIC_TEXTS,
    NUMBERS,
    POINT_TEMPLATES,
    SIDE_TEMPLATES,
    TEXTURE_TEMPLATES,
    TOPIC_TEMPLATES,
    TOPICS,
)

GENERATOR = "mmops synthetic"
COMPOSITIONAL_K = 5


@dataclass(frozen=True)
class SyntheticExample:
    image: Image.Image
    text: str
    label: str
    split: str | None = None  # an explicit split; None leaves it to the hash of the id
    latent: dict[str, Any] = field(default_factory=dict)  # the factors the label came from


Generator = Callable[[int, np.random.Generator, int], list[SyntheticExample]]


@dataclass(frozen=True)
class Family:
    description: str
    n: int  # default rows: enough for the default validation thresholds
    image_size: int
    generate: Generator


def balanced(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """n values in 0..k-1, as equal in count as n allows, in random order."""
    return rng.permutation(np.arange(n) % k)


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


def compositional(n: int, rng: np.random.Generator, size: int) -> list[SyntheticExample]:
    """A glyph 0..K-1 and "add k": label = (glyph + k) mod K; neither modality alone helps."""
    k_classes = COMPOSITIONAL_K
    pairs = balanced(n, k_classes * k_classes, rng)
    examples = []
    for pair in pairs:
        a, k = divmod(int(pair), k_classes)
        image = background(rng, size)
        draw_glyph(image, a, rng, distinct_colour(rng, image))
        text = _pick(rng, ADD_TEMPLATES).format(k=NUMBERS[k])
        label = NUMBERS[(a + k) % k_classes]
        examples.append(
            SyntheticExample(
                finish(image, rng, rng.uniform(4, 16)), text, label, latent={"a": a, "k": k}
            )
        )
    return examples


TINTS = (
    (200, 50, 50),
    (50, 170, 60),
    (50, 80, 210),
    (220, 200, 50),
    (150, 60, 180),
    (40, 190, 200),
)


def text_dominant(n: int, rng: np.random.Generator, size: int) -> list[SyntheticExample]:
    """Topic words in varied sentences carry the label; an image tint hints at it 35% of times."""
    topics = list(TOPICS)
    tints = dict(zip(topics, np.array(TINTS, dtype=np.float32), strict=True))
    examples = []
    for t in balanced(n, len(topics), rng):
        topic = topics[int(t)]
        words = TOPICS[topic]
        if rng.random() < 0.15:  # no topic word: only the image can tell
            text = _pick(rng, GENERIC_TEXTS)
        else:
            w, v = _pick(rng, words), _pick(rng, words)
            text = _pick(rng, TOPIC_TEMPLATES).format(w=w, v=v, W=w.capitalize())
        hinted = rng.random() < 0.35
        tint = tints[topic] if hinted else tints[_pick(rng, topics)]
        image = shape_scene(rng, size, _pick(rng, SHAPES), tint)
        examples.append(SyntheticExample(image, text, topic, latent={"hinted": hinted}))
    return examples


def image_dominant(n: int, rng: np.random.Generator, size: int) -> list[SyntheticExample]:
    """The shape drawn is the label; the captions are generic and say nothing about it."""
    examples = []
    for s in balanced(n, len(SHAPES), rng):
        kind = SHAPES[int(s)]
        image = shape_scene(rng, size, kind, None)
        examples.append(SyntheticExample(image, _pick(rng, CAPTIONS), kind))
    return examples


def many_classes(n: int, rng: np.random.Generator, size: int) -> list[SyntheticExample]:
    """60 classes: colour x shape from the image (20) times a box named in the text (3)."""
    colours, shapes = list(COLOUR_NAMES), SHAPES[:5]
    combos = [(c, s, b) for c in colours for s in shapes for b in BOXES]
    examples = []
    for i in balanced(n, len(combos), rng):
        colour, kind, box = combos[int(i)]
        image = shape_scene(rng, size, kind, np.array(COLOUR_NAMES[colour], dtype=np.float32))
        text = _pick(rng, BOX_TEMPLATES).format(b=box, B=box.capitalize())
        examples.append(SyntheticExample(image, text, f"{colour}-{kind}-{box}"))
    return examples


def small(n: int, rng: np.random.Generator, size: int) -> list[SyntheticExample]:
    """Two shapes; the text asks the colour or kind of the left or right one (6 classes)."""
    colours, kinds = ("red", "green", "blue"), ("circle", "square", "triangle")
    answers = [("colour", c) for c in colours] + [("shape", k) for k in kinds]
    examples = []
    for i in balanced(n, len(answers), rng):
        asked, label = answers[int(i)]
        side = _pick(rng, ("left", "right"))
        parts = {s: [_pick(rng, kinds), _pick(rng, colours)] for s in ("left", "right")}
        parts[side][0 if asked == "shape" else 1] = label
        image = two_shapes_scene(rng, size, tuple(parts["left"]), tuple(parts["right"]))
        text = _pick(rng, SIDE_TEMPLATES[asked]).format(side=side)
        examples.append(SyntheticExample(image, text, label, latent={"side": side, "asked": asked}))
    return examples


def imbalanced(n: int, rng: np.random.Generator, size: int) -> list[SyntheticExample]:
    """The kind of the shape on the side the text names; class counts fall 10:1 geometrically."""
    kinds = ("circle", "square", "triangle", "star", "cross")
    weights = 10.0 ** (-np.arange(len(kinds)) / (len(kinds) - 1))
    counts = np.floor(n * weights / weights.sum()).astype(int)
    counts[0] += n - counts.sum()
    labels = rng.permutation(np.repeat(np.arange(len(kinds)), counts))
    examples = []
    for i in labels:
        side = _pick(rng, ("left", "right"))
        other = "right" if side == "left" else "left"
        parts = {
            side: (kinds[int(i)], _pick(rng, list(COLOUR_NAMES))),
            other: (_pick(rng, kinds), _pick(rng, list(COLOUR_NAMES))),
        }
        image = two_shapes_scene(rng, size, parts["left"], parts["right"])
        text = _pick(rng, POINT_TEMPLATES).format(side=side)
        examples.append(SyntheticExample(image, text, kinds[int(i)], latent={"side": side}))
    return examples


def textures(n: int, rng: np.random.Generator, size: int) -> list[SyntheticExample]:
    """Natural-looking textures; the text asks the material (5 kinds) or the grain (coarse/fine)."""
    answers = [("material", t) for t in TEXTURES] + [("grain", g) for g in ("coarse", "fine")]
    examples = []
    for i in balanced(n, len(answers), rng):
        asked, label = answers[int(i)]
        kind = label if asked == "material" else _pick(rng, TEXTURES)
        grain = label if asked == "grain" else _pick(rng, ("coarse", "fine"))
        field_ = texture_field(kind, rng, size, fine=grain == "fine")
        image = finish(colourise(field_, rng), rng, rng.uniform(2, 10))
        text = _pick(rng, TEXTURE_TEMPLATES[asked])
        examples.append(SyntheticExample(image, text, label, latent={"kind": kind, "grain": grain}))
    return examples


def digits(n: int, rng: np.random.Generator, size: int) -> list[SyntheticExample]:
    """Real 8x8 digit scans (scikit-learn's bundled set), two "add k" instructions per scan."""
    from sklearn.datasets import load_digits

    scans = load_digits()
    order = rng.permutation(len(scans.target))[: max(1, -(-n // 2))]
    cut = np.round(np.array([0.8, 0.9]) * len(order)).astype(int)
    examples = []
    for position, scan in enumerate(order):
        split = "train" if position < cut[0] else "val" if position < cut[1] else "test"
        grey = (scans.images[scan] * (255 / 16)).astype(np.uint8)
        image = Image.fromarray(grey).resize((size, size), Image.NEAREST).convert("RGB")
        digit = int(scans.target[scan])
        for k in rng.choice(10, 2, replace=False):
            text = _pick(rng, DIGIT_TEMPLATES).format(k=NUMBERS[int(k)])
            label = NUMBERS[(digit + int(k)) % 10]
            latent = {"digit": digit, "k": int(k), "scan": int(scan)}
            examples.append(SyntheticExample(image, text, label, split, latent))
    return examples[:n]


FAMILIES: dict[str, Family] = {
    "compositional": Family(compositional.__doc__ or "", 2000, 48, compositional),
    "text_dominant": Family(text_dominant.__doc__ or "", 1500, 48, text_dominant),
    "image_dominant": Family(image_dominant.__doc__ or "", 1500, 48, image_dominant),
    "many_classes": Family(many_classes.__doc__ or "", 3000, 48, many_classes),
    "small": Family(small.__doc__ or "", 300, 48, small),
    "imbalanced": Family(imbalanced.__doc__ or "", 2000, 48, imbalanced),
    "textures": Family(textures.__doc__ or "", 2000, 48, textures),
    "digits": Family(digits.__doc__ or "", 3594, 32, digits),
}


def generate_family(
    name: str, n: int | None = None, seed: int = 0, image_size: int | None = None
) -> list[SyntheticExample]:
    """The examples of family `name`, in memory, with their latent factors."""
    if name not in FAMILIES:
        raise KeyError(f"unknown dataset family {name!r}; one of {', '.join(FAMILIES)}")
    family = FAMILIES[name]
    # A family's own stream: the same seed gives unrelated data in two families.
    rng = np.random.default_rng((seed, list(FAMILIES).index(name)))
    return family.generate(n or family.n, rng, image_size or family.image_size)


def write_family(
    name: str, root: Path | str, n: int | None = None, seed: int = 0, image_size: int | None = None
) -> Path:
    """Write family `name` as a dataset in the contract under `root`; return its manifest path."""
    examples = generate_family(name, n, seed, image_size)
    out = Path(root)
    clear_generated(out, GENERATOR)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index, example in enumerate(examples):
        path = f"images/{index:05d}.png"
        example.image.save(out / path, format="PNG", compress_level=1)
        record = {
            "id": f"{name}-{index:05d}",
            "image": path,
            "text": example.text,
            "label": example.label,
        }
        if example.split is not None:
            record["split"] = example.split
        records.append(record)
    manifest = out / "manifest.jsonl"
    with manifest.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    card = {
        "generator": GENERATOR,
        "family": name,
        "n": len(records),
        "seed": seed,
        "image_size": examples[0].image.size[0] if examples else image_size,
    }
    (out / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return manifest
