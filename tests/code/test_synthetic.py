from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression

from mmops.config import load_params
from mmops.data.synthetic import (
    COMPOSITIONAL_K,
    FAMILIES,
    SyntheticExample,
    generate_family,
    write_family,
)
from mmops.data.synthetic_texts import NUMBERS
from mmops.data.validate import validate_dataset

# Rows per family in these tests: the fewest that still pass the default validation thresholds
# (10 examples per class, 10 rows in val and test).
SMALL_N = {name: 300 for name in FAMILIES} | {"many_classes": 600}


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_writes_a_dataset_that_passes_default_validation(
    name: str, tmp_path: Path
) -> None:
    start = time.perf_counter()
    manifest = write_family(name, tmp_path / name, n=SMALL_N[name], seed=1)
    assert time.perf_counter() - start < 5
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == SMALL_N[name]
    assert {"id", "image", "text", "label"} <= set(records[0])
    report = validate_dataset(tmp_path / name, load_params(None, ["validate.workers=1"]))
    assert report.success, [(c.name, c.detail) for c in report.failed]


def test_every_family_has_a_one_line_description_and_a_default_size() -> None:
    for family in FAMILIES.values():
        assert family.description and "\n" not in family.description
        assert family.n >= 300 and family.image_size >= 16


def test_the_same_seed_gives_the_same_files_and_another_seed_other_files(tmp_path: Path) -> None:
    write_family("textures", tmp_path / "a", n=40, seed=3)
    write_family("textures", tmp_path / "b", n=40, seed=3)
    write_family("textures", tmp_path / "c", n=40, seed=4)
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")
    assert file_hashes(tmp_path / "a") != file_hashes(tmp_path / "c")


def test_rewrites_its_own_dataset_but_refuses_a_folder_with_other_files(tmp_path: Path) -> None:
    write_family("small", tmp_path / "d", n=20)
    write_family("small", tmp_path / "d", n=10)
    assert len((tmp_path / "d" / "manifest.jsonl").read_text().splitlines()) == 10
    assert len(list((tmp_path / "d" / "images").iterdir())) == 10
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_family("small", tmp_path / "other", n=10)
    with pytest.raises(KeyError, match="unknown dataset family"):
        generate_family("nope")


def test_imbalanced_classes_fall_ten_to_one() -> None:
    counts = Counter(e.label for e in generate_family("imbalanced", n=1000))
    assert len(counts) == 5
    assert 9 <= max(counts.values()) / min(counts.values()) <= 11


def test_digits_keep_both_instructions_of_a_scan_in_one_split() -> None:
    examples = generate_family("digits", n=400)
    splits: dict[int, set[str | None]] = {}
    for example in examples:
        splits.setdefault(example.latent["scan"], set()).add(example.split)
        digit, k = example.latent["digit"], example.latent["k"]
        assert example.label == NUMBERS[(digit + k) % 10]
        assert NUMBERS[k] in example.text
    assert all(len(s) == 1 for s in splits.values())
    share = Counter(next(iter(s)) for s in splits.values())
    assert share["train"] == 160 and share["val"] == 20 and share["test"] == 20


def features(examples: list[SyntheticExample]) -> np.ndarray:
    return np.stack(
        [
            np.asarray(e.image.convert("L").resize((16, 16)), dtype=np.float32) / 255
            for e in examples
        ]
    ).reshape(len(examples), -1)


def test_compositional_needs_both_modalities_and_neither_alone_beats_chance() -> None:
    examples = generate_family("compositional", n=1500, seed=0, image_size=32)
    train, test = examples[:1200], examples[1200:]
    y_train, y_test = [e.label for e in train], [e.label for e in test]
    chance = 1 / COMPOSITIONAL_K

    image_model = LogisticRegression(max_iter=300).fit(features(train), y_train)
    image_only = image_model.score(features(test), y_test)
    words = CountVectorizer().fit([e.text for e in train])
    text_model = LogisticRegression(max_iter=300).fit(
        words.transform([e.text for e in train]), y_train
    )
    text_only = text_model.score(words.transform([e.text for e in test]), y_test)
    lookup = {(e.latent["a"], e.latent["k"]): e.label for e in train}
    both = np.mean([lookup[e.latent["a"], e.latent["k"]] == e.label for e in test])

    assert image_only < chance + 0.08, image_only
    assert text_only < chance + 0.08, text_only
    assert both == 1.0
