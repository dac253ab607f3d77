"""The params.yaml sections of what learns: the model, its training and the search over both."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmops.config.errors import ConfigError

# How the two modalities meet: mmops.model.classifier.MultimodalClassifier.
FUSIONS = ("product", "concat", "late", "cross_attention", "zero_shot")


@dataclass(frozen=True)
class VisionConfig:
    """The image encoder built from scratch (ignored when model.vision_pretrained is set)."""

    # cnn: 3x3 convolutions down to a grid (mmops.model.encoders.ConvEncoder), the default:
    # it learns from a few hundred images. vit: a ViT, which needs far more data from scratch.
    arch: str = "cnn"
    hidden_size: int = 128  # width of the tokens it hands to the fusion
    channels: int = 32  # cnn: of the first stage; the later ones have twice as many
    grid: int = 4  # cnn: the spatial grid the convolutions end on
    patch_size: int = 8  # vit
    num_hidden_layers: int = 3  # vit
    num_attention_heads: int = 4  # vit
    intermediate_size: int = 256  # vit
    # vit: how pixels become patch tokens: `conv`, 3x3 convolutions (two per halving of the
    # patch size, mmops.model.ConvStem), or `patch`, the plain ViT linear patch projection.
    stem: str = "conv"

    def __post_init__(self) -> None:
        if self.arch not in ("cnn", "vit"):
            raise ConfigError(f"model.vision.arch: {self.arch!r} is not one of ('cnn', 'vit')")
        if self.stem not in ("conv", "patch"):
            raise ConfigError(f"model.vision.stem: {self.stem!r} is not one of ('conv', 'patch')")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ConfigError(
                "model.vision.patch_size: the conv stem needs a power of two >= 2, "
                f"got {self.patch_size}"
            )
        if min(self.channels, self.grid, self.hidden_size) < 1:
            raise ConfigError("model.vision: channels, grid and hidden_size must be >= 1")


@dataclass(frozen=True)
class TextConfig:
    """The text encoder built from scratch (ignored when model.text_pretrained is set)."""

    # embedding: word-piece embeddings, a phrase convolution and mean/max pooling
    # (mmops.model.encoders.EmbeddingEncoder), the default. bert: a BERT, which needs far
    # more text than most labelled datasets have to learn from scratch.
    arch: str = "embedding"
    hidden_size: int = 128
    num_hidden_layers: int = 2  # bert
    num_attention_heads: int = 4  # bert
    intermediate_size: int = 256  # bert

    def __post_init__(self) -> None:
        if self.arch not in ("embedding", "bert"):
            raise ConfigError(f"model.text.arch: {self.arch!r} is not one of ('embedding', 'bert')")


@dataclass(frozen=True)
class ModelConfig:
    fusion: str = "product"
    # Pixels a side; a pretrained vision checkpoint's image processor sets its own instead.
    image_size: int = 64
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # A dual-encoder checkpoint (CLIP, SigLIP: anything AutoModel loads with vision_model and
    # text_model towers), hub name or folder: both towers, its tokenizer and its image processor.
    pretrained: str | None = None
    # Or one checkpoint per tower; the text one brings its own tokenizer.
    vision_pretrained: str | None = None
    text_pretrained: str | None = None
    # For the tokenizer trained on the dataset's texts when no pretrained text model is given.
    vocab_size: int = 2000
    max_text_length: int = 32
    # auto: max_length (at the checkpoint's full length) for a text checkpoint that pools its
    # last position, as SigLIP does; longest otherwise.
    text_padding: str = "auto"
    hidden_dim: int = 128
    fusion_layers: int = 2
    fusion_heads: int = 4
    dropout: float = 0.1
    # Chance per training example of hiding one modality, for robustness to a missing one.
    modality_dropout: float = 0.0

    def checkpoint(self, part: str) -> tuple[str, str] | None:
        """(params key, name) of the checkpoint the `vision` or `text` encoder is loaded from:
        the dual encoder's for both, else the tower's own; None when it is built from scratch."""
        if self.pretrained:
            return "model.pretrained", self.pretrained
        name = self.vision_pretrained if part == "vision" else self.text_pretrained
        return (f"model.{part}_pretrained", name) if name else None

    def __post_init__(self) -> None:
        if self.pretrained and (self.vision_pretrained or self.text_pretrained):
            raise ConfigError(
                "model.pretrained names both towers: leave model.vision_pretrained and "
                "model.text_pretrained null with it"
            )
        fusions = FUSIONS
        if self.fusion not in fusions:
            raise ConfigError(f"model.fusion: {self.fusion!r} is not one of {fusions}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ConfigError("model.modality_dropout: must be in [0, 1)")
        paddings = ("auto", "longest", "max_length")
        if self.text_padding not in paddings:
            raise ConfigError(f"model.text_padding: {self.text_padding!r} is not one of {paddings}")


def _default_space() -> dict[str, Any]:
    return {
        "train.lr": {"low": 1e-4, "high": 3e-3, "log": True},
        "train.weight_decay": {"low": 0.0, "high": 0.1},
        "model.dropout": {"low": 0.0, "high": 0.3},
        "model.hidden_dim": {"choices": [64, 128, 256]},
        "train.batch_size": {"choices": [16, 32, 64]},
        "model.vision.channels": {"choices": [16, 32, 64]},
        "model.fusion": {"choices": ["product", "concat"]},
        "train.augment": {"choices": ["none", "noise"]},
    }


@dataclass(frozen=True)
class SearchConfig:
    """Optuna search before the final training (`mmops tune`; the retrain flow when enabled)."""

    enabled: bool = False
    trials: int = 20
    timeout_s: float = 0.0  # 0: no limit
    epochs: int = 0  # per trial; 0: train.epochs
    seed: int = 0
    out_dir: str = "models/search"
    # Dotted params key -> {low, high[, log][, step]} or {choices: [...]}; the keys and values
    # are checked against the params when a search starts (mmops.tracking.search_space).
    space: dict[str, Any] = field(default_factory=_default_space)

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ConfigError("train.search.trials: must be >= 1")
        if self.timeout_s < 0 or self.epochs < 0:
            raise ConfigError("train.search.timeout_s and train.search.epochs: must be >= 0")
        if not isinstance(self.space, dict):
            raise ConfigError(
                f"train.search.space: must be a mapping of params keys, got {self.space!r}"
            )
        for key, entry in self.space.items():
            if not isinstance(entry, dict):
                raise ConfigError(
                    f"train.search.space[{key!r}]: must be a mapping, {{low, high}} or "
                    f"{{choices: [...]}}, got {entry!r}"
                )


# What of a pretrained backbone trains: train.finetune.freeze (mmops.training.finetune).
FREEZE_POLICIES = ("none", "all", "last_n")


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (peft) on the pretrained backbones' attention, whose weights stay fixed."""

    enabled: bool = False
    r: int = 8  # rank of each adapter
    alpha: int = 16  # the update is scaled by alpha / r
    dropout: float = 0.05
    # Module names to adapt, matched at the end of each module's path; null: the attention
    # query and value projections, found by name (query/value in BERT, q_proj/v_proj in ViT,
    # CLIP and SigLIP).
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"train.finetune.lora.r: must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"train.finetune.lora.alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"train.finetune.lora.dropout: must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and (
            not self.target_modules or not all(self.target_modules)
        ):
            raise ConfigError(
                "train.finetune.lora.target_modules: a non-empty list of module names, or null "
                f"for the attention query and value projections; got {list(self.target_modules)}"
            )


@dataclass(frozen=True)
class FinetuneConfig:
    """How pretrained backbones train; encoders built from scratch always train at train.lr."""

    # none: every weight trains; all: the backbones are frozen, only the head trains; last_n:
    # the embeddings and all but the last `trainable_blocks` transformer blocks are frozen.
    freeze: str = "none"
    trainable_blocks: int = 2
    # null: train.lr / 10, so pretrained weights move less than the freshly initialised head.
    backbone_lr: float | None = None
    # The learning rate shrinks by this factor per block down from the top block (which trains
    # at backbone_lr); the embeddings get the lowest. 1.0: one rate for the whole backbone.
    layer_decay: float = 1.0
    # Recompute block activations in the backward pass: less memory, about a third more time.
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if self.freeze not in FREEZE_POLICIES:
            raise ConfigError(
                f"train.finetune.freeze: {self.freeze!r} is not one of {FREEZE_POLICIES}"
            )
        if self.trainable_blocks < 1:
            raise ConfigError(
                f"train.finetune.trainable_blocks: must be >= 1, got {self.trainable_blocks}"
            )
        if self.backbone_lr is not None and self.backbone_lr <= 0:
            raise ConfigError(
                f"train.finetune.backbone_lr: must be > 0 (null: train.lr / 10; freeze: all "
                f"to keep the backbone fixed), got {self.backbone_lr}"
            )
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(
                f"train.finetune.layer_decay: must be in (0, 1] (1.0: off), got {self.layer_decay}"
            )
        if self.lora.enabled and self.freeze != "none":
            raise ConfigError(
                f"train.finetune.freeze: must be none with train.finetune.lora.enabled, got "
                f"{self.freeze!r}: LoRA itself freezes the backbone and trains only its adapters"
            )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    classification_weight: float = 1.0
    contrastive_weight: float = 0.0
    # Stop when val accuracy has not improved for this many epochs, counted only once it is
    # above chance (a plateau at chance is waited out); 0 disables.
    early_stopping_patience: int = 6
    # A small dataset gets more epochs (and patience in proportion) to reach this many steps.
    min_steps: int = 1500
    seed: int = 0
    num_workers: int = 2
    # auto: CUDA when available, else CPU. Precision auto: bf16 autocast on CUDA, fp32 on CPU.
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    # Label-preserving image augmentation: none, flip (horizontal), or flip_rotate (flips and
    # 90-degree turns). Orientation-sensitive tasks (left/right questions) need none or flip.
    augment: str = "none"
    out_dir: str = "models/train"
    # The validation report (`mmops validate --out`) whose data version training must match.
    validation_report: str = "reports/validate/validation.json"
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        if self.augment not in ("none", "noise", "flip", "flip_rotate"):
            raise ConfigError("train.augment: must be none, noise, flip or flip_rotate")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError("train.precision: must be auto, fp32 or bf16")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("train.epochs and train.batch_size: must be >= 1")
        if self.min_steps < 0:
            raise ConfigError("train.min_steps: must be >= 0")
