from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mmops.data.dataset import read_manifest
from mmops.model.preprocess import (
    Collator,
    Example,
    MultimodalDataset,
    image_tensor,
    open_image,
    train_tokenizer,
)

TEXTS = [
    "What colour is the circle?",
    "Is the square small or large?",
    "Name the shape of the triangle.",
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=80, max_length=8)


def test_image_tensor_scales_to_minus_one_one() -> None:
    black = image_tensor(Image.new("RGB", (8, 8), (0, 0, 0)), 8)
    white = image_tensor(Image.new("RGB", (8, 8), (255, 255, 255)), 8)
    mixed = image_tensor(Image.new("RGB", (8, 8), (255, 0, 51)), 8)

    assert black.shape == (3, 8, 8) and black.dtype == torch.float32
    assert torch.equal(black, torch.full((3, 8, 8), -1.0))
    assert torch.equal(white, torch.ones(3, 8, 8))
    # Channel-first: red, green, blue planes in that order.
    torch.testing.assert_close(mixed[:, 0, 0], torch.tensor([1.0, -1.0, 51 / 127.5 - 1]))


def test_image_tensor_resizes_to_a_square() -> None:
    gradient = Image.fromarray((np.arange(30 * 40 * 3) % 256).astype(np.uint8).reshape(30, 40, 3))

    pixels = image_tensor(gradient, 16)

    assert pixels.shape == (3, 16, 16)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0


def test_image_tensor_of_none_is_zeros() -> None:
    assert torch.equal(image_tensor(None, 12), torch.zeros(3, 12, 12))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_open_image_from_bytes_and_path_agree(tmp_path: Path, mode: str) -> None:
    image = Image.new("RGB", (10, 6), (200, 30, 90)).convert(mode)
    path = tmp_path / "x.png"
    image.save(path)

    from_path = open_image(path)
    from_str = open_image(str(path))
    from_bytes = open_image(path.read_bytes())

    assert from_path.mode == "RGB" and from_path.size == (10, 6)
    assert torch.equal(image_tensor(from_path, 8), image_tensor(from_bytes, 8))
    assert torch.equal(image_tensor(from_str, 8), image_tensor(from_bytes, 8))


def test_open_image_rejects_bytes_that_are_not_an_image() -> None:
    with pytest.raises(OSError):
        open_image(b"not an image")


def test_collator_masks_missing_modalities_and_pads(tokenizer) -> None:
    pixels = image_tensor(Image.new("RGB", (4, 4), (255, 255, 255)), 4)
    examples = [
        Example(pixels, "what colour is the circle", 0),
        Example(None, "name the shape", 1),
        Example(pixels, None, 2),
    ]

    batch = Collator(tokenizer, spec=4, max_text_length=8)(examples)

    assert batch["image_present"].tolist() == [True, False, True]
    assert batch["text_present"].tolist() == [True, True, False]
    assert batch["labels"].tolist() == [0, 1, 2]
    assert batch["pixel_values"].shape == (3, 3, 4, 4)
    assert torch.equal(batch["pixel_values"][1], torch.zeros(3, 4, 4))
    assert torch.equal(batch["pixel_values"][0], pixels)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 3
    lengths = mask.sum(1).tolist()
    assert lengths[0] > lengths[1] > lengths[2] == 2  # a missing text is [CLS] [SEP]
    assert ids.shape[1] == lengths[0]
    assert (ids[mask == 0] == tokenizer.pad_token_id).all()


def test_collator_truncates_to_max_text_length(tokenizer) -> None:
    long_text = " ".join(["what colour is the circle"] * 10)

    batch = Collator(tokenizer, spec=4, max_text_length=8)([Example(None, long_text, 0)])

    assert batch["input_ids"].shape == (1, 8)
    assert batch["input_ids"][0, -1].item() == tokenizer.sep_token_id


def test_trained_tokenizer_knows_its_words_and_adds_cls_sep(tokenizer) -> None:
    ids = tokenizer("Circle")["input_ids"]

    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "circle"  # lower-cased
    assert tokenizer.unk_token_id in tokenizer("☃")["input_ids"]
    assert len(tokenizer) <= 80


def test_train_tokenizer_is_deterministic(demo_dir: Path) -> None:
    # Training, resuming and every DDP rank each train their own tokenizer from the same
    # texts; a different vocabulary would give the same weights different token ids.
    texts = [t for t in read_manifest(demo_dir)["text"] if isinstance(t, str)]

    vocabs = [train_tokenizer(texts, vocab_size=2000, max_length=32).get_vocab() for _ in range(4)]

    assert all(vocab == vocabs[0] for vocab in vocabs[1:])


def test_tokenizer_round_trips_through_save_pretrained(tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)

    for text in TEXTS[:3]:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.model_max_length == 8


def test_dataset_reads_rows_with_missing_modalities_and_unknown_labels(tmp_path: Path) -> None:
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "a.png")
    frame = pd.DataFrame(
        {
            "image": ["a.png", None, "a.png"],
            "text": ["x", "y", None],
            "label": ["blue", "red", "never seen"],
        },
        dtype=object,  # as read_manifest gives it: a null is None, not NaN
    )

    dataset = MultimodalDataset(
        tmp_path, frame, {"blue": 0, "red": 1}, spec=8, text_transform=str.upper
    )

    assert len(dataset) == 3
    first, second, third = dataset[0], dataset[1], dataset[2]
    assert first.pixels.shape == (3, 8, 8) and first.text == "X" and first.label == 0
    assert second.pixels is None and second.label == 1
    assert third.text is None and third.label == -1


def test_dataset_applies_image_transform(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / "a.png")
    frame = pd.DataFrame({"image": ["a.png"], "text": ["x"], "label": ["k"]})

    def invert(image: Image.Image) -> Image.Image:
        return Image.eval(image, lambda v: 255 - v)

    dataset = MultimodalDataset(tmp_path, frame, {"k": 0}, spec=8, image_transform=invert)

    assert torch.equal(dataset[0].pixels, torch.ones(3, 8, 8))


def test_open_image_accepts_an_in_memory_jpeg() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (9, 9), (10, 200, 10)).save(buffer, format="JPEG")

    image = open_image(buffer.getvalue())

    assert image.mode == "RGB" and image.size == (9, 9)
