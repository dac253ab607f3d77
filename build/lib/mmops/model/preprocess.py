"""Preprocessing shared by training, evaluation and prediction: one path from records to tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from mmops.model.example import Example
from mmops.model.image_processing import ImageSpec, as_spec, open_image

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


ImageTransform = Callable[[Image.Image], Image.Image]
TextTransform = Callable[[str], str]


def image_tensor(image: Image.Image | None, spec: ImageSpec | int) -> torch.Tensor:
    """The model's (3, H, W) float tensor of an RGB image by its spec (an int: the default spec
    at that size, pixels to [-1, 1]); zeros stand in for a missing image."""
    return torch.from_numpy(as_spec(spec).array(image))


class MultimodalDataset(Dataset):
    """Rows of a manifest as examples; images are decoded in DataLoader workers."""

    def __init__(
        self,
        root: Path | str,
        frame: pd.DataFrame,
        label_index: dict[str, int],
        spec: ImageSpec | int,
        image_transform: ImageTransform | None = None,
        text_transform: TextTransform | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.max_pixels = max_pixels  # checked from each header again as it is decoded
        self.images = list(frame["image"])
        self.texts = list(frame["text"])
        # Unknown labels (a class absent from training) map to -1 and count as errors.
        self.labels = [label_index.get(label, -1) for label in frame["label"]]
        self.spec = as_spec(spec)
        self.image_transform = image_transform
        self.text_transform = text_transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Example:
        pixels = None
        # isinstance, not "is not None": pandas may hold a missing value as NaN.
        if isinstance(self.images[index], str):
            # A transform (blur, noise) is defined on the file's own pixels: no reduced decode.
            draft = self.spec if self.image_transform is None else None
            image = open_image(self.root / self.images[index], self.max_pixels, draft)
            if self.image_transform is not None:
                image = self.image_transform(image)
            pixels = image_tensor(image, self.spec)
        text = self.texts[index] if isinstance(self.texts[index], str) else None
        if text is not None and self.text_transform is not None:
            text = self.text_transform(text)
        return Example(pixels, text, self.labels[index])


class Collator:
    """Batches examples: stacked pixels, tokenized texts, modality masks and labels."""

    def __init__(
        self,
        tokenizer: Any,
        spec: ImageSpec | int,
        max_text_length: int,
        text_padding: str = "longest",
    ) -> None:
        self.tokenizer = tokenizer
        self.spec = as_spec(spec)
        self.max_text_length = max_text_length
        # `model.text_padding`: max_length pads every text to max_text_length, so a text
        # tower that pools a fixed position sees each text alike whatever its batch.
        self.padding: str | bool = "max_length" if text_padding == "max_length" else True

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            [e.text or "" for e in examples],
            padding=self.padding,
            truncation=True,
            max_length=self.max_text_length,
            return_attention_mask=True,
            return_tensors="pt",
        )
        blank = image_tensor(None, self.spec)
        return {
            "pixel_values": torch.stack(
                [e.pixels if e.pixels is not None else blank for e in examples]
            ),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "image_present": torch.tensor([e.pixels is not None for e in examples]),
            "text_present": torch.tensor([e.text is not None for e in examples]),
            "labels": torch.tensor([e.label for e in examples]),
        }


MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask", "image_present", "text_present")


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS}


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int) -> Any:
    """A WordPiece tokenizer whose vocabulary comes from the dataset's own texts (no hub needed).

    The vocabulary is every character seen (as a word start and as a '##' continuation, so no
    word is ever unknown) plus the most frequent whole words, ties broken alphabetically. Built
    by hand rather than by the `tokenizers` trainer, whose ties follow hash-map order: the same
    texts must give the same tokenizer, or a seeded run, a resumed run and the processes of a
    distributed run would each split text differently.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        pieces = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        words.update(word for word, _span in pieces)
    chars = sorted({c for word in words for c in word})
    vocab = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    room = max(vocab_size - len(vocab), 0)
    by_count = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    vocab += by_count[:room]

    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=max_length,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
