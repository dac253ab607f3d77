from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmops.data.demo import (
    CARD_NAME,
    COLOURS,
    GROUPS,
    SHAPES,
    SIZES,
    DemoExample,
    make_demo_data,
    render,
    sample_example,
    write_examples,
)


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_records(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def test_writes_n_rows_images_and_a_card(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    manifest = make_demo_data(out, n=30, seed=4, image_size=40)
    assert manifest == out / "manifest.jsonl"
    records = read_records(manifest)
    assert len(records) == 30
    assert all(list(r) == ["id", "image", "text", "label", "group"] for r in records)
    assert len({r["id"] for r in records}) == 30
    assert {r["label"] for r in records} <= set(COLOURS) | set(SHAPES) | set(SIZES)
    assert {r["group"] for r in records} <= set(GROUPS)
    for record in records:
        with Image.open(out / record["image"]) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (40, 40))
    card = json.loads((out / CARD_NAME).read_text())
    assert card == {"generator": "mmops demo-data", "n": 30, "seed": 4, "image_size": 40}


def test_image_paths_are_sharded_by_thousands() -> None:
    assert sample_example(5, 0).image == "images/000/demo-000005.png"
    assert sample_example(1234, 0).image == "images/001/demo-001234.png"


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    make_demo_data(tmp_path / "a", n=40, seed=3)
    make_demo_data(tmp_path / "b", n=40, seed=3)
    hashes = file_hashes(tmp_path / "a")
    assert len(hashes) == 42  # 40 images, the manifest and the card
    assert hashes == file_hashes(tmp_path / "b")


def test_different_seed_differs(tmp_path: Path) -> None:
    make_demo_data(tmp_path / "a", n=40, seed=3)
    make_demo_data(tmp_path / "b", n=40, seed=4)
    a, b = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    assert a.keys() == b.keys()
    assert a["manifest.jsonl"] != b["manifest.jsonl"]
    images = [k for k in a if k.endswith(".png")]
    assert all(a[k] != b[k] for k in images)


def test_sample_example_does_not_depend_on_other_examples() -> None:
    forward = [sample_example(i, 9) for i in range(50)]
    backward = [sample_example(i, 9) for i in reversed(range(50))][::-1]
    assert forward == backward


def test_refuses_to_overwrite_a_directory_that_is_not_demo_data(tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("do not delete")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_demo_data(out, n=5)
    assert [p.name for p in out.iterdir()] == ["thesis.txt"]


def test_refuses_a_card_written_by_something_else(tmp_path: Path) -> None:
    out = tmp_path / "other"
    out.mkdir()
    (out / CARD_NAME).write_text(json.dumps({"generator": "someone else"}))
    (out / "manifest.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError):
        make_demo_data(out, n=5)
    assert (out / "manifest.jsonl").read_text() == "{}\n"


def test_refuses_an_unreadable_card(tmp_path: Path) -> None:
    out = tmp_path / "other"
    out.mkdir()
    (out / CARD_NAME).write_text("not json")
    with pytest.raises(FileExistsError):
        make_demo_data(out, n=5)


def test_writes_into_an_existing_empty_directory(tmp_path: Path) -> None:
    make_demo_data(tmp_path, n=5)
    assert len(read_records(tmp_path / "manifest.jsonl")) == 5


def test_overwrites_a_previous_demo_dataset(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    make_demo_data(out, n=20, seed=1)
    make_demo_data(out, n=8, seed=2)
    fresh = tmp_path / "fresh"
    make_demo_data(fresh, n=8, seed=2)
    # No stale images from the first, larger run are left behind.
    assert file_hashes(out) == file_hashes(fresh)


def bayes_accuracy(examples: list[DemoExample], key: Callable[[DemoExample], Hashable]) -> float:
    """Accuracy of predicting the most common label for each value of `key`, on the same data."""
    by_key: dict[Hashable, Counter] = defaultdict(Counter)
    for example in examples:
        by_key[key(example)][example.label] += 1
    return sum(c.most_common(1)[0][1] for c in by_key.values()) / len(examples)


def test_label_needs_both_modalities() -> None:
    # Many examples per text: with few, the in-sample majority overfits towards 0.5.
    examples = [sample_example(i, seed=0) for i in range(10_000)]
    text_only = bayes_accuracy(examples, lambda e: e.text)
    image_only = bayes_accuracy(examples, lambda e: (e.colour, e.shape, e.size))
    both = bayes_accuracy(examples, lambda e: (e.text, e.colour, e.shape, e.size))
    assert text_only < 0.5
    assert image_only < 0.5
    assert both == 1.0


def test_question_attribute_and_answer_are_consistent() -> None:
    for i in range(300):
        example = sample_example(i, seed=2)
        assert example.label == getattr(example, example.asked)
        assert example.label in {"colour": COLOURS, "shape": SHAPES, "size": SIZES}[example.asked]


def test_groups_follow_their_shares() -> None:
    counts = Counter(sample_example(i, seed=5).group for i in range(4000))
    for group, share in GROUPS.items():
        assert abs(counts[group] / 4000 - share) < 0.03


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in names], dtype=float)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


@pytest.mark.parametrize("seed", [0, 3])
def test_rendered_image_carries_the_colour(seed: int) -> None:
    # The background is grey and the palette saturated, so the most saturated pixels are the
    # shape's whatever its position, size or group.
    for index in range(60):
        example = sample_example(index, seed)
        pixels = np.asarray(render(example, index, seed, 64), dtype=float).reshape(-1, 3)
        saturation = pixels.max(axis=1) - pixels.min(axis=1)
        shape_rgb = pixels[np.argsort(saturation)[-20:]].mean(axis=0)
        assert nearest_colour(shape_rgb) == example.colour, (index, example)


def test_render_is_deterministic() -> None:
    example = sample_example(7, 1)
    first = np.asarray(render(example, 7, 1, 48))
    assert first.shape == (48, 48, 3)
    assert np.array_equal(first, np.asarray(render(example, 7, 1, 48)))
    assert not np.array_equal(first, np.asarray(render(example, 7, 2, 48)))


def test_parallel_generation_equals_single_process(tmp_path: Path) -> None:
    n, seed = 4500, 5
    manifest = make_demo_data(tmp_path / "parallel", n=n, seed=seed, workers=2)
    records = read_records(manifest)
    expected = [
        {"id": e.id, "image": e.image, "text": e.text, "label": e.label, "group": e.group}
        for e in (sample_example(i, seed) for i in range(n))
    ]
    assert records == expected
    # Images at chunk edges and in different shards, rendered here in this one process.
    single = tmp_path / "single"
    for index in (0, 1, 562, 563, 999, 1000, 2250, 4499):
        (record,) = write_examples(str(single), index, index + 1, seed, 64)
        assert (single / record["image"]).read_bytes() == (
            tmp_path / "parallel" / record["image"]
        ).read_bytes()
