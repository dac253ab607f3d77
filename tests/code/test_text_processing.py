"""The serving collator (numpy and `tokenizers`) gives training's batches bit for bit."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmops.model.example import Example
from mmops.model.image_processing import ImageSpec
from mmops.model.preprocess import Collator, image_tensor, train_tokenizer
from mmops.model.text_processing import TextEncoder
from mmops.serving.inputs import ArrayCollator, text_encoder

WORDS = ["red", "circle", "Square", "naïve", "café", "東京", "🙂", "don't", "x-ray", "42", "  "]


def texts(seed: int, n: int = 60) -> list[str]:
    """Varied texts: empty, blank, accented, CJK, emoji, punctuation, and far over any limit."""
    rng = random.Random(seed)
    out = ["", " ", "\t\n", "a", "A RED CIRCLE!!!", "word " * 200]
    for _ in range(n):
        words = rng.choices([*WORDS, chr(rng.randrange(33, 0x2FFF))], k=rng.randrange(1, 40))
        out.append(rng.choice([" ", "", "  ", "\n"]).join(words))
    return out


def wordpiece(folder: Path) -> Path:
    train_tokenizer(texts(0), 120, 24).save_pretrained(str(folder))
    return folder


def bert(folder: Path) -> Path:
    from transformers import BertTokenizerFast

    vocab = folder / "vocab.txt"
    folder.mkdir(parents=True, exist_ok=True)
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "circle", "##s", "a", "##e"]
    vocab.write_text("\n".join(pieces + sorted({c for t in texts(1) for c in t.lower()})) + "\n")
    BertTokenizerFast(str(vocab), model_max_length=16).save_pretrained(str(folder / "out"))
    return folder / "out"


def byte_bpe(folder: Path, padding_side: str = "right") -> Path:
    """A byte-level BPE (as CLIP's and GPT-2's), padding on `padding_side`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts(2), vocab_size=400, special_tokens=["<pad>", "<eos>"])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<eos>"
    )
    wrapped.padding_side = padding_side
    wrapped.truncation_side = "left"
    wrapped.save_pretrained(str(folder))
    return folder


def unigram(folder: Path) -> Path:
    """A SentencePiece-style Unigram (as SigLIP's and T5's), with a template post-processor."""
    from tokenizers import SentencePieceUnigramTokenizer, processors
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(
        texts(3), vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    eos = sp.token_to_id("</s>")
    sp._tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", eos)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=sp._tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )
    wrapped.save_pretrained(str(folder))
    return folder


TOKENIZERS = {
    "wordpiece": wordpiece,
    "bert": bert,
    "byte_bpe": byte_bpe,
    "byte_bpe_left": lambda folder: byte_bpe(folder, "left"),
    "unigram": unigram,
}


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
@pytest.mark.parametrize("padding", ["longest", "max_length"])
@pytest.mark.parametrize("max_length", [5, 24])
def test_text_encoder_matches_the_transformers_tokenizer(
    tmp_path: Path, kind: str, padding: str, max_length: int
) -> None:
    from transformers import AutoTokenizer

    folder = TOKENIZERS[kind](tmp_path / kind)
    spec = ImageSpec.default(8)
    training = Collator(AutoTokenizer.from_pretrained(str(folder)), spec, max_length, padding)
    serving = ArrayCollator(text_encoder(folder, max_length, padding), spec)
    for seed in range(3):
        batch = [Example(None, t, 0) for t in texts(seed + 10)]
        for size in (1, 7, len(batch)):  # padding to the longest depends on the batch
            want, got = training(batch[:size]), serving(batch[:size])
            for name in ("input_ids", "attention_mask"):
                assert got[name].dtype == np.int64
                np.testing.assert_array_equal(got[name], want[name].numpy(), err_msg=name)


def test_serving_batches_equal_training_batches_whole(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = wordpiece(tmp_path / "tok")
    spec = ImageSpec(size=(20, 20), mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, 31, 3), dtype=np.uint8)) for h in (9, 40)]
    rows = [(images[0], "a red circle"), (None, "only text"), (images[1], None), (None, None)]
    training = Collator(AutoTokenizer.from_pretrained(str(folder)), spec, 24)
    serving = ArrayCollator(text_encoder(folder, 24, "longest"), spec)
    want = training([Example(image_tensor(i, spec) if i else None, t, 3) for i, t in rows])
    got = serving([Example(spec.array(i) if i else None, t, 3) for i, t in rows])
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == value.numpy().dtype, name
        np.testing.assert_array_equal(got[name], value.numpy(), err_msg=name)


def test_a_tokenizer_folder_without_a_pad_token_is_refused_by_name(tmp_path: Path) -> None:
    folder = wordpiece(tmp_path / "tok")
    (folder / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: no pad_token"):
        TextEncoder.from_folder(folder, 8, False)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        TextEncoder.from_folder(tmp_path, 8, False)


def test_an_empty_batch_has_no_rows(tmp_path: Path) -> None:
    encoder = TextEncoder.from_folder(wordpiece(tmp_path / "tok"), 8, True)
    assert encoder([])["input_ids"].shape == (0, 8)
