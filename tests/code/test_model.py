from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTModel

from mmops.config import FUSIONS, ConfigError, ModelConfig, load_params
from mmops.data.dataset import read_manifest
from mmops.model.classifier import (
    ConvStem,
    ModelOutput,
    MultimodalClassifier,
    build_encoders,
    contrastive_loss,
)
from mmops.model.preprocess import train_tokenizer
from mmops.model.storage import META_FILE, load_model, save_model
from mmops.training.train import train
from mmops.training.validation_gate import DataValidation

# zero_shot reads a dual encoder's embeddings (tests/code/test_backbones.py).
HEAD_FUSIONS = [fusion for fusion in FUSIONS if fusion != "zero_shot"]

ARCHS = (("cnn", "embedding"), ("vit", "bert"))
VOCAB = 60
LABELS = ["a", "b", "c", "d", "e"]
BATCH = 6
# Unlike the tiny config's 32, so a model built from the pretrained folders is recognisable.
PRETRAINED_WIDTH = 48


def tiny_config(overrides: tuple[str, ...], *extra: str) -> ModelConfig:
    return load_params(None, [*overrides, *extra]).model


def build(config: ModelConfig, vocab_size: int = VOCAB) -> MultimodalClassifier:
    torch.manual_seed(0)
    vision, text = build_encoders(config, vocab_size)
    return MultimodalClassifier(config, len(LABELS), vision, text).eval()


def make_batch(config: ModelConfig, vocab_size: int = VOCAB) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, vocab_size, (BATCH, 10), generator=generator)
    attention_mask = torch.ones(BATCH, 10, dtype=torch.long)
    attention_mask[::2, 7:] = 0  # every other text is padded
    size = config.image_size
    pixels = torch.rand(BATCH, 3, size, size, generator=generator) * 2 - 1
    return {
        "pixel_values": pixels,
        "input_ids": input_ids.masked_fill(attention_mask == 0, 0),
        "attention_mask": attention_mask,
        "image_present": torch.ones(BATCH, dtype=torch.bool),
        "text_present": torch.ones(BATCH, dtype=torch.bool),
    }


@pytest.mark.parametrize("fusion", HEAD_FUSIONS)
def test_forward_gives_logits_and_unit_embeddings(
    tiny_overrides: tuple[str, ...], fusion: str
) -> None:
    config = tiny_config(tiny_overrides, f"model.fusion={fusion}")
    model = build(config)

    with torch.no_grad():
        output = model(**make_batch(config))

    assert output.logits.shape == (BATCH, len(LABELS))
    assert torch.isfinite(output.logits).all()
    for embeds in (output.image_embeds, output.text_embeds):
        assert embeds.shape == (BATCH, config.hidden_dim)
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(BATCH))


@pytest.mark.parametrize("fusion", HEAD_FUSIONS)
@pytest.mark.parametrize("modality", ["image_present", "text_present"])
def test_missing_modality_changes_only_its_row(
    tiny_overrides: tuple[str, ...], fusion: str, modality: str
) -> None:
    config = tiny_config(tiny_overrides, f"model.fusion={fusion}")
    model = build(config)
    batch = make_batch(config)
    missing = {**batch, modality: torch.tensor([False] + [True] * (BATCH - 1))}

    with torch.no_grad():
        full, partial = model(**batch).logits, model(**missing).logits

    assert torch.isfinite(partial).all()
    assert not torch.allclose(full[0], partial[0])
    torch.testing.assert_close(full[1:], partial[1:])


def without_dropout(model: nn.Module) -> nn.Module:
    # BERT's attention dropout is not set from model.dropout; zero every Dropout so that
    # modality dropout is the only randomness left in train mode.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


@pytest.mark.parametrize("fusion", HEAD_FUSIONS)
def test_modality_dropout_acts_only_in_train_mode(
    tiny_overrides: tuple[str, ...], fusion: str
) -> None:
    config = tiny_config(
        tiny_overrides, f"model.fusion={fusion}", "model.modality_dropout=0.9", "model.dropout=0"
    )
    model = without_dropout(build(config))
    batch = make_batch(config)
    hide_image = {**batch, "image_present": torch.zeros(BATCH, dtype=torch.bool)}
    hide_text = {**batch, "text_present": torch.zeros(BATCH, dtype=torch.bool)}

    with torch.no_grad():
        evals = [model(**batch).logits for _ in range(3)]
        full, no_image, no_text = (model(**b).logits for b in (batch, hide_image, hide_text))
        model.train()
        # Batch norm (the conv stem) normalises by batch statistics in train mode; keep its
        # running statistics so that modality dropout is the only difference from eval mode.
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        torch.manual_seed(0)
        trained = model(**batch).logits

    for logits in evals:
        torch.testing.assert_close(logits, full)
    # Each row in train mode is the row with its image hidden, its text hidden, or neither;
    # at p=0.9 over 6 rows at least one is dropped for this seed.
    dropped = 0
    for row in range(BATCH):
        if any(torch.allclose(trained[row], ref[row], atol=1e-5) for ref in (no_image, no_text)):
            dropped += 1
        else:
            torch.testing.assert_close(trained[row], full[row], atol=1e-5, rtol=1e-4)
    assert dropped > 0


def fake_output(image: torch.Tensor, text: torch.Tensor) -> ModelOutput:
    return ModelOutput(
        logits=torch.zeros(len(image), 2),
        image_embeds=nn.functional.normalize(image, dim=-1),
        text_embeds=nn.functional.normalize(text, dim=-1),
        logit_scale=torch.tensor(10.0),
    )


def test_contrastive_loss_is_lower_for_matched_pairs() -> None:
    embeds = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    everything = torch.ones(8, dtype=torch.bool)

    matched = contrastive_loss(fake_output(embeds, embeds), everything)
    shuffled = contrastive_loss(fake_output(embeds, embeds.roll(1, dims=0)), everything)

    assert matched < shuffled


def test_contrastive_loss_is_zero_with_fewer_than_two_pairs() -> None:
    embeds = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    one_pair = torch.tensor([True, False, False, False])

    assert contrastive_loss(fake_output(embeds, embeds), one_pair).item() == 0.0


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["what colour is the shape", "is the object small or large", "name the shape"] * 5
    return train_tokenizer(texts, vocab_size=VOCAB, max_length=16)


@pytest.mark.parametrize("fusion", HEAD_FUSIONS)
@pytest.mark.parametrize(("vision", "text"), ARCHS)
def test_save_load_round_trip(
    tiny_overrides: tuple[str, ...], tokenizer, tmp_path: Path, fusion: str, vision: str, text: str
) -> None:
    config = tiny_config(
        tiny_overrides,
        f"model.fusion={fusion}",
        f"model.vision.arch={vision}",
        f"model.text.arch={text}",
    )
    model = build(config, vocab_size=len(tokenizer))
    batch = make_batch(config, vocab_size=len(tokenizer))

    save_model(model, tokenizer, LABELS, tmp_path / "model", extra={"note": "x"})
    loaded = load_model(tmp_path / "model")

    assert loaded.labels == LABELS
    assert loaded.meta["note"] == "x"
    assert loaded.model.config == config
    assert not loaded.model.training
    assert (
        loaded.tokenizer("name the shape")["input_ids"] == tokenizer("name the shape")["input_ids"]
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("stem", ["conv", "patch"])
def test_vision_stem_gives_the_patch_grid_and_round_trips(
    tiny_overrides: tuple[str, ...], tokenizer, tmp_path: Path, stem: str
) -> None:
    config = tiny_config(tiny_overrides, "model.vision.arch=vit", f"model.vision.stem={stem}")
    model = build(config, vocab_size=len(tokenizer))
    batch = make_batch(config, vocab_size=len(tokenizer))
    grid = (config.image_size // config.vision.patch_size) ** 2
    projection = model.vision.embeddings.patch_embeddings.projection

    tokens = model.vision(pixel_values=batch["pixel_values"]).last_hidden_state
    save_model(model, tokenizer, LABELS, tmp_path / "model")
    loaded = load_model(tmp_path / "model")

    assert tokens.shape == (BATCH, grid + 1, config.vision.hidden_size)
    assert isinstance(projection, ConvStem) == (stem == "conv")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, model(**batch).logits)


def test_model_saved_before_the_stem_and_arch_options_loads_as_a_vit_and_bert(
    tiny_overrides: tuple[str, ...], tokenizer, tmp_path: Path
) -> None:
    config = tiny_config(
        tiny_overrides, "model.vision.arch=vit", "model.text.arch=bert", "model.vision.stem=patch"
    )
    model = build(config, vocab_size=len(tokenizer))
    batch = make_batch(config, vocab_size=len(tokenizer))
    folder = save_model(model, tokenizer, LABELS, tmp_path / "model")
    meta = json.loads((folder / META_FILE).read_text())
    for section, key in (("vision", "stem"), ("vision", "arch"), ("text", "arch")):
        del meta["model"][section][key]
    del meta["vocab_size"]
    (folder / META_FILE).write_text(json.dumps(meta))

    loaded = load_model(folder)

    assert loaded.model.config.vision.stem == "patch"
    assert (loaded.model.config.vision.arch, loaded.model.config.text.arch) == ("vit", "bert")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.vision.stem=resnet", r"model\.vision\.stem"),
        ("model.vision.patch_size=6", "patch_size"),
    ],
)
def test_bad_vision_stem_settings_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_params(None, [override])


def test_load_model_without_meta_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=META_FILE):
        load_model(tmp_path)


def test_unknown_fusion_is_rejected_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.fusion"):
        load_params(None, ["model.fusion=sum"])


@pytest.fixture
def pretrained_dirs(demo_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A tiny ViT and a tiny BERT with its own tokenizer, saved as `save_pretrained` folders."""
    texts = [t for t in read_manifest(demo_dir)["text"] if isinstance(t, str)]
    tokenizer = train_tokenizer(texts, vocab_size=200, max_length=32)
    torch.manual_seed(0)
    vit = ViTModel(
        ViTConfig(
            image_size=64,
            patch_size=16,
            hidden_size=PRETRAINED_WIDTH,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    bert = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=PRETRAINED_WIDTH,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    vision_dir, text_dir = tmp_path / "vit", tmp_path / "bert"
    vit.save_pretrained(vision_dir)
    bert.save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    return vision_dir, text_dir


def test_build_encoders_loads_pretrained_weights(
    tiny_overrides: tuple[str, ...], pretrained_dirs: tuple[Path, Path]
) -> None:
    vision_dir, text_dir = pretrained_dirs
    config = tiny_config(
        tiny_overrides, f"model.vision_pretrained={vision_dir}", f"model.text_pretrained={text_dir}"
    )

    torch.manual_seed(123)  # a fresh init would differ from the saved weights
    vision, text = build_encoders(config, vocab_size=VOCAB)

    saved_vit, saved_bert = (
        AutoModel.from_pretrained(vision_dir),
        AutoModel.from_pretrained(text_dir),
    )
    torch.testing.assert_close(
        vision.embeddings.patch_embeddings.projection.weight,
        saved_vit.embeddings.patch_embeddings.projection.weight,
    )
    torch.testing.assert_close(
        text.embeddings.word_embeddings.weight, saved_bert.embeddings.word_embeddings.weight
    )
    assert vision.pooler is None and text.pooler is None


def test_train_with_pretrained_encoders_saves_a_loadable_model(
    tiny_overrides: tuple[str, ...],
    demo_dir: Path,
    demo_validation: DataValidation,
    pretrained_dirs: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    vision_dir, text_dir = pretrained_dirs
    params = load_params(
        None,
        [
            *tiny_overrides,
            "train.epochs=1",
            f"model.vision_pretrained={vision_dir}",
            f"model.text_pretrained={text_dir}",
        ],
    )

    out = tmp_path / "out"
    result = train(demo_dir, params, out, progress=False, validation=demo_validation)
    loaded = load_model(result.model_dir)

    assert result.epochs_run == 1
    assert loaded.labels == result.labels
    # Sizes come from the pretrained folders, not from model.vision / model.text.
    assert loaded.model.vision.config.hidden_size == PRETRAINED_WIDTH
    assert loaded.model.text.config.hidden_size == PRETRAINED_WIDTH
    # The pretrained text model brings its tokenizer, and the saved model keeps it.
    assert loaded.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(text_dir).get_vocab()
