"""Fine-tuning controls for pretrained backbones (train.finetune), on tiny random-initialised ViT,
BERT and CLIP checkpoints built with save_pretrained: what trains, at which rate, LoRA's round trip
through a saved model, gradient checkpointing, and config errors that name the key."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from mmops.config import ConfigError, Params, load_params
from mmops.model.classifier import MultimodalClassifier
from mmops.model.preprocess import train_tokenizer
from mmops.model.storage import load_model, save_model
from mmops.tracking.search_space import parse_space
from mmops.training.finetune import (
    Backbone,
    checkpointing_enabled,
    find_blocks,
    pretrained_parts,
)
from mmops.training.optim import build_optimizer
from mmops.training.runtime import setup_runtime
from mmops.training.steps import train_step
from mmops.training.train import CHECKPOINT_FILE, build_model, train
from mmops.training.validation_gate import DataValidation

TEXTS = ["a red circle", "a blue square on the left", "two green triangles", "seven", "x"]
LABELS = ["a", "b", "c"]
LAYERS = 2
RUNTIME = setup_runtime("cpu", "fp32")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A two-block ViT and a two-block BERT with its tokenizer, as save_pretrained folders."""
    folder = tmp_path_factory.mktemp("pretrained")
    tokenizer = train_tokenizer(TEXTS * 10, vocab_size=200, max_length=32)
    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_hidden_layers": LAYERS, "num_attention_heads": 2}
    vit = ViTModel(
        ViTConfig(image_size=64, patch_size=16, intermediate_size=64, **small),
        add_pooling_layer=False,
    )
    bert = BertModel(
        BertConfig(
            vocab_size=len(tokenizer), max_position_embeddings=64, intermediate_size=64, **small
        ),
        add_pooling_layer=False,
    )
    vit.save_pretrained(folder / "vit")
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder / "vit")
    bert.save_pretrained(folder / "bert")
    tokenizer.save_pretrained(folder / "bert")
    return folder / "vit", folder / "bert"


def finetune_params(
    tiny_overrides: tuple[str, ...], checkpoints: tuple[Path, Path], *extra: str
) -> Params:
    vit, bert = checkpoints
    pretrained = (f"model.vision_pretrained={vit}", f"model.text_pretrained={bert}")
    return load_params(None, [*tiny_overrides, *pretrained, "train.warmup_ratio=0", *extra])


def build(params: Params) -> tuple[MultimodalClassifier, tuple[Backbone, ...]]:
    """The model train() builds for these params, and its pretrained backbones."""
    torch.manual_seed(0)
    return build_model(params.model, params.train, len(LABELS), 200, RUNTIME)


def batch(text_dir: Path, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = AutoTokenizer.from_pretrained(str(text_dir))(
        TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )
    n = len(TEXTS)
    inputs = {
        "pixel_values": torch.randn(n, 3, 64, 64, generator=generator),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "image_present": torch.ones(n, dtype=torch.bool),
        "text_present": torch.ones(n, dtype=torch.bool),
    }
    return inputs, torch.randint(0, len(LABELS), (n,), generator=generator)


def run_steps(
    built: tuple[MultimodalClassifier, tuple[Backbone, ...]], params: Params, text_dir: Path
) -> None:
    """A few optimisation steps, with the optimizer train() builds for these params."""
    model, backbones = built
    steps = 3
    optimizer, _ = build_optimizer(model, params.train, steps, RUNTIME, backbones)
    for step in range(steps):
        inputs, labels = batch(text_dir, seed=step)
        train_step(model.train(), inputs, labels, optimizer, params.train, RUNTIME)


def block(name: str) -> int | None:
    """The block a parameter name is in (BERT `encoder.layer.1.`, ViT `layers.1.`), if any."""
    found = re.search(r"\.(?:layers?|blocks)\.(\d+)\.", f".{name}")
    return int(found.group(1)) if found else None


def below_top_block(name: str) -> bool:
    """Embeddings and every block but the top one: what `last_n` with one block freezes."""
    index = block(name)
    return "embeddings." in name or (index is not None and index < LAYERS - 1)


def round_lr(lr: float) -> float:
    """The rate to 6 significant digits: products of decay factors are not exact in floats."""
    return float(f"{lr:.6g}")


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, bool]:
    return {name: not torch.equal(before[name], p) for name, p in module.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_freeze_last_n_keeps_lower_blocks_bit_identical_and_trains_the_top(
    tiny_overrides: tuple[str, ...], checkpoints: tuple[Path, Path], checkpointing: bool
) -> None:
    params = finetune_params(
        tiny_overrides,
        checkpoints,
        "train.finetune.freeze=last_n",
        "train.finetune.trainable_blocks=1",
        f"train.finetune.gradient_checkpointing={str(checkpointing).lower()}",
        "train.lr=0.01",
    )
    model, backbones = build(params)
    before = snapshot(model)

    run_steps((model, backbones), params, checkpoints[1])

    moved = changed(before, model)
    for part in ("vision", "text"):
        below = [n for n in moved if n.startswith(f"{part}.") and below_top_block(n)]
        top = [n for n in moved if n.startswith(f"{part}.") and block(n) == LAYERS - 1]
        assert below and top
        # Embeddings and lower blocks: bit-identical; the top block (above frozen ones, which
        # gradient checkpointing must not cut off from its gradient): trained.
        assert not any(moved[n] for n in below), [n for n in below if moved[n]]
        assert any(moved[n] for n in top)
        assert not any(model.get_parameter(n).requires_grad for n in below)
    assert moved["head.1.weight"] and moved["image_proj.weight"]


def test_freeze_all_trains_only_the_head(
    tiny_overrides: tuple[str, ...], checkpoints: tuple[Path, Path]
) -> None:
    params = finetune_params(tiny_overrides, checkpoints, "train.finetune.freeze=all")
    model, backbones = build(params)
    before = snapshot(model)

    run_steps((model, backbones), params, checkpoints[1])

    moved = changed(before, model)
    backbone = [n for n in moved if n.startswith(("vision.", "text."))]
    assert backbone and not any(moved[n] for n in backbone)
    assert moved["head.4.weight"] and moved["text_proj.weight"]


def test_freeze_in_a_training_run_keeps_the_checkpoint_weights_bit_identical(
    tiny_overrides: tuple[str, ...],
    checkpoints: tuple[Path, Path],
    demo_dir: Path,
    demo_validation: DataValidation,
    tmp_path: Path,
) -> None:
    params = finetune_params(
        tiny_overrides,
        checkpoints,
        "train.epochs=1",
        "train.finetune.freeze=last_n",
        "train.finetune.trainable_blocks=1",
    )

    train(demo_dir, params, tmp_path, progress=False, validation=demo_validation)

    trained = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["model"]
    for part, folder in zip(("vision", "text"), checkpoints, strict=True):
        # Loaded, not read from the file: transformers renames some checkpoint keys on loading.
        pretrained = AutoModel.from_pretrained(str(folder)).state_dict()
        pretrained = {k: v for k, v in pretrained.items() if f"{part}.{k}" in trained}
        frozen = [k for k in pretrained if below_top_block(k)]
        top = [k for k in pretrained if block(k) == LAYERS - 1]
        assert frozen and top
        assert all(torch.equal(trained[f"{part}.{k}"], pretrained[k]) for k in frozen)
        assert not all(torch.equal(trained[f"{part}.{k}"], pretrained[k]) for k in top)


def test_backbone_blocks_get_the_backbone_rate_decayed_per_block_down_from_the_top(
    tiny_overrides: tuple[str, ...], checkpoints: tuple[Path, Path]
) -> None:
    params = finetune_params(
        tiny_overrides,
        checkpoints,
        "model.text_pretrained=null",
        "train.lr=0.001",
        "train.finetune.backbone_lr=0.0001",
        "train.finetune.layer_decay=0.5",
    )
    model, backbones = build(params)
    optimizer, _ = build_optimizer(model, params.train, 10, RUNTIME, backbones)
    rate = {p: round_lr(g["initial_lr"]) for g in optimizer.param_groups for p in g["params"]}

    assert [b.part for b in backbones] == ["vision"]
    vision = model.vision
    assert {rate[p] for p in vision.layers[1].parameters()} == {1e-4}
    assert {rate[p] for p in vision.layers[0].parameters()} == {5e-5}
    assert {rate[p] for p in vision.embeddings.parameters()} == {2.5e-5}
    # What follows the top block trains at the backbone rate; the head and the text encoder
    # built from scratch at train.lr, which is the first group, the rate the run logs.
    assert {rate[p] for p in vision.layernorm.parameters()} == {1e-4}
    assert {rate[p] for p in [*model.head.parameters(), *model.text.parameters()]} == {1e-3}
    assert optimizer.param_groups[0]["initial_lr"] == 1e-3
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)


def test_backbone_rate_defaults_to_a_tenth_of_the_head_rate(
    tiny_overrides: tuple[str, ...], checkpoints: tuple[Path, Path]
) -> None:
    params = finetune_params(tiny_overrides, checkpoints, "train.lr=0.002")
    model, backbones = build(params)
    optimizer, _ = build_optimizer(model, params.train, 10, RUNTIME, backbones)
    rate = {p: round_lr(g["initial_lr"]) for g in optimizer.param_groups for p in g["params"]}

    assert [b.part for b in backbones] == ["vision", "text"]
    backbone = [*model.vision.parameters(), *model.text.parameters()]
    assert {rate[p] for p in backbone} == {2e-4}
    assert {rate[p] for p in model.head.parameters()} == {0.002}


def test_models_built_from_scratch_keep_one_rate_and_nothing_frozen(
    tiny_params: Params,
) -> None:
    model, backbones = build(tiny_params)
    optimizer, _ = build_optimizer(model, tiny_params.train, 10, RUNTIME, backbones)

    assert backbones == ()
    assert {g["initial_lr"] for g in optimizer.param_groups} == {tiny_params.train.lr}
    assert [g["weight_decay"] for g in optimizer.param_groups] == [
        tiny_params.train.weight_decay,
        0.0,
    ]


def test_lora_trains_only_adapters_and_head_and_reloads_with_equal_predictions(
    tiny_overrides: tuple[str, ...], checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    params = finetune_params(
        tiny_overrides, checkpoints, "train.finetune.lora.enabled=true", "train.lr=0.01"
    )
    model, backbones = build(params)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable)
    assert all("lora_" in n for n in trainable if n.startswith(("vision.", "text.")))
    assert "head.1.weight" in trainable
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "lora_" in n}
    assert targets == {"q_proj", "v_proj", "query", "value"}  # ViT's and BERT's names
    before = snapshot(model)
    run_steps((model, backbones), params, checkpoints[1])
    moved = changed(before, model)
    frozen = [n for n in moved if n.startswith(("vision.", "text.")) and "lora_" not in n]
    assert not any(moved[n] for n in frozen)
    assert any(moved[n] for n in moved if "lora_B" in n)  # B starts at zero: a no-op adapter

    inputs, _ = batch(checkpoints[1], seed=9)
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoints[1]))
    folder = save_model(model, tokenizer, LABELS, tmp_path / "model")
    loaded = load_model(folder)

    # Saved with the adapters merged in: a plain model, which loads without peft.
    assert not any("lora_" in n for n, _ in loaded.model.named_parameters())
    assert type(loaded.model.vision) is ViTModel and type(loaded.model.text) is BertModel
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).logits, expected)
        # Saving merged a copy: the model in training keeps its adapters.
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
    assert any("lora_" in n for n, _ in model.named_parameters())


def test_a_lora_training_run_saves_a_plain_model_and_resumes(
    tiny_overrides: tuple[str, ...],
    checkpoints: tuple[Path, Path],
    demo_dir: Path,
    demo_validation: DataValidation,
    tmp_path: Path,
) -> None:
    lora = "train.finetune.lora.enabled=true"
    one, two = (
        finetune_params(tiny_overrides, checkpoints, lora, f"train.epochs={n}") for n in (1, 2)
    )
    train(demo_dir, one, tmp_path, progress=False, validation=demo_validation)

    # The checkpoint holds the adapters: a resumed run adds them before loading it.
    resumed = train(demo_dir, two, tmp_path, progress=False, validation=demo_validation)

    assert resumed.epochs_run == 2
    saved = load_file(str(resumed.model_dir / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in saved)
    loaded = load_model(resumed.model_dir)
    assert loaded.labels == resumed.labels
    # The parameters reported are the saved model's: adapters merged, not counted twice.
    assert resumed.parameters == sum(p.numel() for p in loaded.model.parameters())


def test_gradient_checkpointing_is_enabled_on_the_backbones(
    tiny_overrides: tuple[str, ...], checkpoints: tuple[Path, Path]
) -> None:
    off, _ = build(finetune_params(tiny_overrides, checkpoints))
    on, _ = build(
        finetune_params(tiny_overrides, checkpoints, "train.finetune.gradient_checkpointing=true")
    )

    assert not checkpointing_enabled(off.vision) and not checkpointing_enabled(off.text)
    assert checkpointing_enabled(on.vision) and checkpointing_enabled(on.text)


def clip_checkpoint(folder: Path) -> Path:
    """A CLIP with three blocks per tower, its image processor and a tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = train_tokenizer(TEXTS * 10, vocab_size=200, max_length=32)
    shared = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3}
    shared["num_attention_heads"] = 2
    text = {**shared, "vocab_size": len(tokenizer), "max_position_embeddings": 32}
    text["eos_token_id"] = tokenizer.sep_token_id  # CLIP pools at its end-of-text token
    vision = {**shared, "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    ).save_pretrained(folder)
    size = {"shortest_edge": 32}
    CLIPImageProcessor(size=size, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_lora_on_both_towers_of_a_dual_encoder_saves_and_reloads(
    tiny_overrides: tuple[str, ...], tmp_path: Path
) -> None:
    folder = clip_checkpoint(tmp_path / "clip")
    params = load_params(
        None,
        [
            *tiny_overrides,
            f"model.pretrained={folder}",
            "model.image_size=32",
            "train.finetune.lora.enabled=true",
            "train.finetune.layer_decay=0.5",
        ],
    )
    torch.manual_seed(0)
    model, backbones = build_model(params.model, params.train, len(LABELS), 200, RUNTIME)
    assert [(b.part, len(b.blocks)) for b in backbones] == [("vision", 3), ("text", 3)]
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters()}
    assert {"q_proj", "v_proj"} <= adapted and "k_proj" not in adapted
    for p in model.parameters():  # as if trained: LoRA's B starts at zero, a no-op
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    inputs, _ = batch(folder)
    inputs["pixel_values"] = inputs["pixel_values"][..., :32, :32]
    with torch.no_grad():
        expected = model.eval()(**inputs).logits

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    loaded = load_model(save_model(model, tokenizer, LABELS, tmp_path / "model"))

    assert not any("lora_" in n for n, _ in loaded.model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).logits, expected)


def test_blocks_are_found_inside_a_wrapper(tmp_path: Path) -> None:
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(clip_checkpoint(tmp_path))
    wrapper = torch.nn.ModuleDict({"tower": clip.text_model, "proj": clip.text_projection})

    assert len(find_blocks(wrapper)) == 3
    assert find_blocks(wrapper) == find_blocks(clip.text_model)
    assert find_blocks(torch.nn.Linear(2, 2)) == ()
    params = load_params(None, [f"model.pretrained={tmp_path}"])
    assert pretrained_parts(params.model) == ("vision", "text")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.finetune.freeze=some"], r"train\.finetune\.freeze"),
        (["train.finetune.trainable_blocks=0"], r"train\.finetune\.trainable_blocks"),
        (["train.finetune.backbone_lr=0"], r"train\.finetune\.backbone_lr"),
        (["train.finetune.layer_decay=1.5"], r"train\.finetune\.layer_decay"),
        (["train.finetune.lora.r=0"], r"train\.finetune\.lora\.r"),
        (["train.finetune.lora.dropout=1.0"], r"train\.finetune\.lora\.dropout"),
        (["train.finetune.lora.target_modules=[]"], r"train\.finetune\.lora\.target_modules"),
        (["train.finetune.lora.rank=4"], r"train\.finetune\.lora\.rank"),
        (
            ["train.finetune.lora.enabled=true", "train.finetune.freeze=last_n"],
            r"train\.finetune\.freeze",
        ),
    ],
)
def test_bad_finetune_settings_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_params(None, overrides)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.finetune.freeze=all"], r"train\.finetune\.freeze: .*has none"),
        (["train.finetune.lora.enabled=true"], r"train\.finetune\.lora\.enabled"),
        (["train.finetune.gradient_checkpointing=true"], "gradient_checkpointing"),
    ],
)
def test_controls_that_need_a_pretrained_backbone_say_so(
    tiny_params: Params, overrides: list[str], key: str
) -> None:
    params = load_params(None, [*overrides])
    with pytest.raises(ConfigError, match=key):
        build_model(tiny_params.model, params.train, 3, 200, RUNTIME)


def test_lora_target_modules_the_backbone_lacks_are_named(
    tiny_overrides: tuple[str, ...], checkpoints: tuple[Path, Path]
) -> None:
    params = finetune_params(
        tiny_overrides,
        checkpoints,
        "train.finetune.lora.enabled=true",
        "train.finetune.lora.target_modules=[query, value]",
    )
    with pytest.raises(ConfigError, match=r"lora\.target_modules: .*model\.vision"):
        build(params)


def test_finetune_keys_can_be_searched() -> None:
    space = {
        "train.finetune.backbone_lr": {"low": 1e-5, "high": 3e-4, "log": True},
        "train.finetune.layer_decay": {"low": 0.6, "high": 1.0},
        "train.finetune.freeze": {"choices": ["none", "all", "last_n"]},
        "train.finetune.trainable_blocks": {"low": 1, "high": 4},
        "train.finetune.lora.r": {"choices": [4, 8, 16]},
    }
    params = load_params(None)
    train_config = replace(params.train, search=replace(params.train.search, space=space))

    dims = {dim.key: dim for dim in parse_space(replace(params, train=train_config))}

    assert set(dims) == set(space)
    assert dims["train.finetune.trainable_blocks"].integer
    assert not dims["train.finetune.backbone_lr"].integer
