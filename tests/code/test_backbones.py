"""Dual-encoder backbones (CLIP, SigLIP) on random-initialised checkpoints built with
save_pretrained at tiny sizes: the towers give the checkpoint's own embeddings, loaded once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from dual_checkpoints import TEXTS, clip_checkpoint, siglip_checkpoint
from typer.testing import CliRunner

from mmops.cli import app
from mmops.config import ConfigError, ModelConfig
from mmops.data.demo import make_demo_data
from mmops.model.backbones import PretrainedUnavailable, load_dual, with_text_padding
from mmops.model.classifier import MultimodalClassifier, build_encoders
from mmops.model.preprocess import Collator, Example
from mmops.model.storage import load_model, save_model


@pytest.fixture(scope="module", params=["clip", "siglip"])
def dual(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    return (clip_checkpoint if request.param == "clip" else siglip_checkpoint)(folder)


def inputs(folder: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(str(folder))(
        TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )
    pixels = torch.randn(len(TEXTS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return pixels, {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def test_tower_embeddings_equal_the_checkpoints_own_features(dual: Path) -> None:
    from transformers import AutoModel

    reference = AutoModel.from_pretrained(str(dual)).eval()
    image, text, _ = load_dual(str(dual))
    pixels, tokens = inputs(dual)
    with torch.no_grad():
        expected_image = reference.get_image_features(pixel_values=pixels).pooler_output
        expected_text = reference.get_text_features(**tokens).pooler_output
        got_image = image.eval()(pixel_values=pixels).summary
        got_text = text.eval()(**tokens).summary
    assert torch.allclose(got_image, expected_image, atol=1e-5, rtol=0)
    assert torch.allclose(got_text, expected_text, atol=1e-5, rtol=0)
    # Each text its own embedding: nothing pooled at a token that only sees itself.
    assert torch.cdist(got_text, got_text).triu(1)[0, 1:].min() > 1e-4


def test_a_dual_encoder_model_saves_and_reloads_with_the_same_outputs(
    dual: Path, tmp_path: Path
) -> None:
    from transformers import AutoModel, AutoTokenizer

    config = replace(ModelConfig(), pretrained=str(dual), image_size=32, max_text_length=16)
    vision, text = build_encoders(config, vocab_size=0)
    model = MultimodalClassifier(config, 3, vision, text).eval()
    scale = AutoModel.from_pretrained(str(dual)).logit_scale.reshape(())
    assert torch.equal(model.logit_scale.detach(), scale.detach())  # the checkpoint's own
    tokenizer = AutoTokenizer.from_pretrained(str(dual))
    save_model(model, tokenizer, ["a", "b", "c"], tmp_path / "model")
    loaded = load_model(tmp_path / "model").model
    pixels, tokens = inputs(dual)
    present = torch.tensor([True, True, False, True]), torch.tensor([True, False, True, True])
    with torch.no_grad():
        before = model(pixels, **tokens, image_present=present[0], text_present=present[1])
        after = loaded(pixels, **tokens, image_present=present[0], text_present=present[1])
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.text_embeds, after.text_embeds)


def test_a_text_embedding_does_not_depend_on_the_other_texts_of_its_batch(dual: Path) -> None:
    """SigLIP pools its last position: padded to the longest text of the batch, a short text's
    embedding would change with its neighbours. `text_padding: auto` pads it to the
    checkpoint's full length; CLIP pools its end-of-text token and keeps longest padding."""
    from transformers import AutoTokenizer

    config = with_text_padding(replace(ModelConfig(), pretrained=str(dual), image_size=32))
    siglip = "siglip" in dual.name
    assert config.text_padding == ("max_length" if siglip else "longest")
    assert config.max_text_length == (16 if siglip else ModelConfig().max_text_length)
    collate = Collator(
        AutoTokenizer.from_pretrained(str(dual)), 32, config.max_text_length, config.text_padding
    )
    _, text, _ = load_dual(str(dual))
    short, long = Example(None, "a red circle", 0), Example(None, " ".join(TEXTS), 0)

    def summaries(examples: list[Example]) -> torch.Tensor:
        batch = collate(examples)
        with torch.no_grad():
            return text.eval()(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).summary

    alone, beside_a_long_one = summaries([short]), summaries([short, long])
    assert torch.allclose(alone[0], beside_a_long_one[0], atol=1e-5, rtol=0)


def test_a_checkpoint_that_is_not_a_dual_encoder_is_refused_naming_the_key(
    tmp_path: Path,
) -> None:
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(
        str(tmp_path)
    )
    with pytest.raises(ConfigError, match=r"model\.pretrained"):
        load_dual(str(tmp_path))


def test_both_pretrained_and_a_tower_checkpoint_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.pretrained"):
        ModelConfig(pretrained="a", vision_pretrained="b")


def test_a_checkpoint_that_cannot_be_loaded_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no waiting for a hub this machine cannot reach
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        PretrainedUnavailable, match=r"model\.pretrained: cannot load 'no-such/clip'"
    ):
        load_dual("no-such/clip")
    data = tmp_path / "data"
    make_demo_data(data, n=60, seed=0)
    result = CliRunner().invoke(
        app,
        ["train", "--data", str(data), "--allow-unvalidated", "--set", "model.pretrained=no/such"],
    )
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "error: model.pretrained: cannot load 'no/such'" in result.output
