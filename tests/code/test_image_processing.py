"""Image preprocessing from the checkpoint: the spec, its match with transformers' processors,
reduced-size JPEG decoding, and models saved before specs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import (
    AutoImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from mmops.config import ModelConfig, Params
from mmops.model.digests import DIGESTS_FILE
from mmops.model.image_processing import DRAFT_FACTOR, SPEC_KEY, ImageSpec, image_spec_for
from mmops.model.preprocess import Collator, Example, image_tensor, open_image
from mmops.model.storage import META_FILE, load_model, save_model
from mmops.serving.predictor import Predictor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOWER = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
TOWER |= {"num_attention_heads": 2}
TEXT_TOWER = {**TOWER, "vocab_size": 99, "max_position_embeddings": 16}
# Images of many shapes: wider, taller, square, the target's own size, smaller than a crop.
SIZES = ((317, 211), (211, 317), (64, 64), (224, 224), (500, 375), (20, 30), (1001, 333))


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like image: smooth colour fields at several scales, sharp shapes, grain."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    smooth = Image.fromarray(cells).resize((width, height), Image.Resampling.BICUBIC)
    grain = np.asarray(smooth, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(grain, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(2, max(3, width // 4)))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(map(int, rng.integers(0, 256, 3))))
    return image


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def checkpoint(folder: Path, model: torch.nn.Module | None, processor: object | None) -> str:
    if model is not None:
        model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)  # type: ignore[attr-defined]
    return str(folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny random CLIP, SigLIP and ViT checkpoints, each with its image processor."""
    root = tmp_path_factory.mktemp("checkpoints")
    clip = CLIPConfig(
        text_config=TEXT_TOWER,
        vision_config={**TOWER, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    siglip = SiglipConfig(
        text_config=TEXT_TOWER, vision_config={**TOWER, "image_size": 32, "patch_size": 8}
    )
    vit = ViTConfig(**TOWER, image_size=48, patch_size=16)
    return {
        "clip": checkpoint(
            root / "clip",
            CLIPModel(clip),
            CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        ),
        "siglip": checkpoint(
            root / "siglip",
            SiglipModel(siglip),
            SiglipImageProcessor(size={"height": 32, "width": 32}),
        ),
        "vit": checkpoint(
            root / "vit", ViTModel(vit), ViTImageProcessor(size={"height": 48, "width": 48})
        ),
        "clip_bare": checkpoint(root / "clip_bare", CLIPModel(clip), None),
        "vit_bare": checkpoint(root / "vit_bare", ViTModel(vit), None),
    }


EXPECTED = {
    "clip": ImageSpec(
        shortest_edge=32, crop=(32, 32), mean=CLIP_MEAN, std=CLIP_STD, resample="bicubic"
    ),
    "siglip": ImageSpec(size=(32, 32), resample="bicubic"),
    "vit": ImageSpec(size=(48, 48)),
    # No processor config: the checkpoint config's image size, the default preprocessing.
    "clip_bare": ImageSpec.default(32),
    "vit_bare": ImageSpec.default(48),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_spec_comes_from_the_checkpoint_and_round_trips_through_json(
    checkpoints: dict[str, str], name: str
) -> None:
    spec = ImageSpec.from_pretrained(checkpoints[name])

    assert spec == EXPECTED[name]
    assert ImageSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_the_real_checkpoints_processors_give_their_224_pipelines() -> None:
    clip = ImageSpec.from_processor_dict(CLIPImageProcessor().to_dict())
    siglip = ImageSpec.from_processor_dict(SiglipImageProcessor().to_dict())
    vit = ImageSpec.from_processor_dict(ViTImageProcessor().to_dict())

    assert clip == ImageSpec(
        shortest_edge=224, crop=(224, 224), mean=CLIP_MEAN, std=CLIP_STD, resample="bicubic"
    )
    assert siglip == ImageSpec(size=(224, 224), resample="bicubic")
    assert vit == ImageSpec(size=(224, 224)) and vit.image_size == 224


# transformers' PIL backend (what AutoImageProcessor gives without torchvision) resizes with
# Pillow too: measured max abs difference 4.8e-7 (CLIP: float32 rounding of its mean and std),
# 0 for SigLIP and ViT. The torchvision backend resizes in float without Pillow's rounding to
# 8 bits: up to 1e-2 is allowed there (the bound), not measured on these machines.
PIL_TOLERANCE, TORCHVISION_TOLERANCE = 1e-6, 1e-2


@pytest.mark.parametrize(
    "processor",
    [
        CLIPImageProcessor(),
        SiglipImageProcessor(),
        ViTImageProcessor(),
        CLIPImageProcessor(size={"shortest_edge": 37}, crop_size={"height": 31, "width": 31}),
        # A crop larger than the resized image: padded with black, as transformers does.
        CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 25, "width": 25}),
    ],
    ids=["clip", "siglip", "vit", "clip_odd_crop", "clip_padded_crop"],
)
def test_pixels_match_the_processors_pixel_values(processor: object, tmp_path: Path) -> None:
    loaded = AutoImageProcessor.from_pretrained(checkpoint(tmp_path, None, processor))
    spec = ImageSpec.from_pretrained(str(tmp_path))
    pil = getattr(loaded, "backend", "pil") == "pil" and not type(loaded).__name__.endswith("Fast")
    tolerance = PIL_TOLERANCE if pil else TORCHVISION_TOLERANCE

    for seed, (width, height) in enumerate(SIZES):
        image = photo(width, height, seed)
        expected = loaded(images=image, return_tensors="pt")["pixel_values"][0]
        pixels = image_tensor(image, spec)
        assert pixels.shape == expected.shape == (3, spec.image_size, spec.image_size)
        assert (pixels - expected).abs().max().item() <= tolerance, (width, height)


@pytest.mark.parametrize("size", [8, 16, 64])
def test_the_default_spec_gives_the_old_tensors_bit_for_bit(size: int) -> None:
    for seed, (width, height) in enumerate(((size, size), (40, 30), (7, 90))):
        image = photo(width, height, seed)
        # What image_tensor computed before specs.
        resized = (
            image
            if image.size == (size, size)
            else image.resize((size, size), Image.Resampling.BILINEAR)
        )
        old = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / np.float32(127.5)
        old = torch.from_numpy(np.ascontiguousarray(old - np.float32(1.0)))

        assert torch.equal(image_tensor(image, ImageSpec.default(size)), old)
        assert torch.equal(image_tensor(image, size), old)


def test_image_spec_for_takes_the_dual_checkpoint_then_the_vision_one_then_the_default(
    checkpoints: dict[str, str],
) -> None:
    assert image_spec_for(ModelConfig(pretrained=checkpoints["clip"])) == EXPECTED["clip"]
    assert image_spec_for(ModelConfig(vision_pretrained=checkpoints["vit"])) == EXPECTED["vit"]
    assert image_spec_for(ModelConfig(image_size=40)) == ImageSpec.default(40)
    with pytest.raises(ValueError, match=r"model\.vision_pretrained"):
        image_spec_for(ModelConfig(vision_pretrained=str(Path(checkpoints["vit"]) / "missing")))


def test_processor_options_mmops_does_not_apply_are_refused() -> None:
    config = ViTImageProcessor().to_dict() | {"do_pad": True}
    with pytest.raises(ValueError, match="do_pad"):
        ImageSpec.from_processor_dict(config)
    with pytest.raises(ValueError, match="square"):
        ImageSpec(size=(32, 48))
    with pytest.raises(TypeError, match="ImageSpec"):
        image_tensor(photo(8, 8), "8")  # type: ignore[arg-type]


# CLIP's spec (shortest edge 224, bicubic, crop) and the default at 64 (bilinear).
DRAFT_SPECS = {
    "clip": ImageSpec(
        shortest_edge=224, crop=(224, 224), mean=CLIP_MEAN, std=CLIP_STD, resample="bicubic"
    ),
    "default": ImageSpec.default(64),
}


def levels(a: torch.Tensor, b: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """|a - b| in pixel levels (0-255)."""
    return (a - b).abs() * torch.tensor(spec.std)[:, None, None] / spec.rescale


# Measured on this 2000x1500 photo: CLIP, decoded at 1/2, max 9 levels (mean 0.64) from the
# full decode, where JPEG itself is 10 (mean 1.02) from the original pixels; the default,
# decoded at 1/4, 1 (0.09) where JPEG is 2 (0.19). bench/image_decode.py has more sizes.
@pytest.mark.parametrize(("name", "decoded"), [("clip", (1000, 750)), ("default", (500, 375))])
def test_a_big_jpeg_decodes_at_reduced_size_no_further_off_than_jpeg_itself(
    name: str, decoded: tuple[int, int]
) -> None:
    spec = DRAFT_SPECS[name]
    original = photo(2000, 1500, seed=3)
    data = jpeg(original)

    drafted, full = open_image(data, spec=spec), open_image(data)
    draft_error = levels(image_tensor(drafted, spec), image_tensor(full, spec), spec)
    jpeg_error = levels(image_tensor(full, spec), image_tensor(original, spec), spec)

    assert full.size == (2000, 1500) and drafted.size == decoded
    assert min(drafted.size) >= DRAFT_FACTOR * min(spec.resized_size(*full.size))
    assert draft_error.max() <= jpeg_error.max() and draft_error.mean() <= jpeg_error.mean()


def test_a_reduced_decode_resized_elsewhere_is_taken_at_its_own_size() -> None:
    spec = DRAFT_SPECS["default"]
    resized = open_image(jpeg(photo(2000, 1500, seed=7)), spec=spec).resize((300, 200))
    plain = resized.copy()
    plain.info.clear()  # Pillow copied the decode's geometry to the resized copy

    assert torch.equal(image_tensor(resized, spec), image_tensor(plain, spec))


def test_smaller_jpegs_and_pngs_decode_in_full() -> None:
    spec = ImageSpec.default(64)
    small = jpeg(photo(300, 300, seed=4))  # under twice DRAFT_FACTOR times 64 a side
    buffer = io.BytesIO()
    photo(1600, 1200, seed=5).save(buffer, format="PNG")

    assert open_image(small, spec=spec).size == (300, 300)
    assert torch.equal(
        image_tensor(open_image(small, spec=spec), spec), image_tensor(open_image(small), spec)
    )
    assert open_image(buffer.getvalue(), spec=spec).size == (1600, 1200)


def test_the_pixel_limit_is_checked_from_the_header_before_a_reduced_decode() -> None:
    data = jpeg(photo(1600, 1200, seed=6))
    with pytest.raises(ValueError, match="over the limit"):
        open_image(data, max_pixels=1600 * 1200 - 1, spec=ImageSpec.default(64))


def test_the_collator_fills_a_missing_image_at_the_specs_size(tokenizer: object) -> None:
    spec = DRAFT_SPECS["clip"]
    batch = Collator(tokenizer, spec, 8)([Example(None, "a text", 0)])

    assert batch["pixel_values"].shape == (1, 3, 224, 224)


@pytest.fixture(scope="module")
def tokenizer() -> object:
    from mmops.model.preprocess import train_tokenizer

    return train_tokenizer(["what colour is the shape"] * 5, vocab_size=64, max_length=16)


@pytest.fixture(scope="module")
def model_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_params: Params, tokenizer: object
) -> Path:
    from mmops.model.classifier import MultimodalClassifier, build_encoders

    torch.manual_seed(0)
    vision, text = build_encoders(tiny_params.model, len(tokenizer))  # type: ignore[arg-type]
    model = MultimodalClassifier(tiny_params.model, 3, vision, text).eval()
    return save_model(model, tokenizer, ["a", "b", "c"], tmp_path_factory.mktemp("m") / "model")


def records() -> list[dict[str, object]]:
    return [
        {"id": i, "text": "what colour is the shape", "image": jpeg(photo(*size, seed=i))}
        for i, size in enumerate(((90, 60), (64, 64), (700, 500)))
    ]


def test_a_model_saved_before_specs_loads_with_the_default_and_predicts_the_same(
    model_dir: Path, tmp_path: Path, tiny_params: Params
) -> None:
    import shutil

    old = shutil.copytree(model_dir, tmp_path / "old")
    meta = json.loads((old / META_FILE).read_text())
    assert ImageSpec.from_dict(meta[SPEC_KEY]) == ImageSpec.default(tiny_params.model.image_size)
    del meta[SPEC_KEY]
    (old / META_FILE).write_text(json.dumps(meta))
    (old / DIGESTS_FILE).unlink()  # such a model predates digests too

    now, before = Predictor(model_dir), Predictor(old)

    assert before.image_spec == ImageSpec.default(tiny_params.model.image_size)
    # The same labels and scores; only the model's name (its folder's) differs.
    for old_result, result in zip(
        before.predict_batch(records()), now.predict_batch(records()), strict=True
    ):
        assert {**old_result, "model": ""} == {**result, "model": ""}


def test_the_predictor_preprocesses_with_the_saved_spec(
    model_dir: Path, tmp_path: Path, tiny_params: Params, tokenizer: object
) -> None:
    size = tiny_params.model.image_size
    spec = ImageSpec(shortest_edge=size, crop=(size, size), mean=CLIP_MEAN, std=CLIP_STD)
    loaded = load_model(model_dir)
    folder = save_model(loaded.model, tokenizer, loaded.labels, tmp_path / "m", image_spec=spec)
    data = jpeg(photo(700, 500, seed=9))

    predictor = Predictor(folder)
    example = predictor.example({"id": 1, "image": data})

    assert predictor.image_spec == load_model(folder).image_spec == spec
    assert example.pixels is not None
    assert torch.equal(
        torch.from_numpy(example.pixels), image_tensor(open_image(data, spec=spec), spec)
    )
