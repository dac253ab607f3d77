"""Fine-tuning pretrained backbones: what trains (freeze policy, LoRA), at which learning rate
(backbone rate, layer-wise decay) and at what memory cost (gradient checkpointing).

A backbone is an encoder loaded from a checkpoint (`model.pretrained`, `model.vision_pretrained`,
`model.text_pretrained`); encoders built from scratch are never frozen and train at `train.lr`.
Blocks are found by shape, not by architecture: the longest `nn.ModuleList` named `layer`,
`layers` or `blocks` in the encoder (BERT `encoder.layer`, ViT `layers`, CLIP and SigLIP
`encoder.layers`), so a new family of checkpoints needs no code here.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from mmops.config import ConfigError, FinetuneConfig, LoraConfig, ModelConfig, TrainConfig

log = logging.getLogger(__name__)

ENCODERS = ("vision", "text")
BLOCK_LISTS = ("layer", "layers", "blocks")
# Pretrained weights are already near a good solution; at the head's rate they are pulled away
# from it before the head has learned anything ("catastrophic forgetting").
BACKBONE_LR_SCALE = 0.1
# LoRA's default targets: query and value, the pair the LoRA paper adapts (Hu et al., 2021).
ATTENTION_PROJECTIONS = (("query", "value"), ("q_proj", "v_proj"), ("q", "v"))
# peft names every adapter weight it adds with this prefix (lora_A, lora_B, lora_embedding_A).
ADAPTER_MARK = "lora_"


@dataclass(frozen=True)
class Backbone:
    """A pretrained encoder of the model: its attribute, the module, its blocks bottom first."""

    part: str
    module: nn.Module
    blocks: tuple[nn.Module, ...]

    def depths(self) -> dict[nn.Parameter, int]:
        """Pretrained weights by depth: 0 before the first block (embeddings), i + 1 in block
        i, and len(blocks) + 1 after the last (final norm, projection); adapters are left out."""
        in_block = {p: i + 1 for i, block in enumerate(self.blocks) for p in block.parameters()}
        depths: dict[nn.Parameter, int] = {}
        seen_block = False
        for name, p in self.module.named_parameters():
            if ADAPTER_MARK in name:
                continue
            seen_block = seen_block or p in in_block
            depths[p] = in_block.get(p, len(self.blocks) + 1 if seen_block else 0)
        return depths


def pretrained_parts(config: ModelConfig) -> tuple[str, ...]:
    """The encoders (`vision`, `text`) that the model config loads from a checkpoint."""
    return tuple(part for part in ENCODERS if config.checkpoint(part) is not None)


def find_blocks(module: nn.Module) -> tuple[nn.Module, ...]:
    """The transformer blocks of an encoder, bottom first; empty if it has none."""
    lists = [
        m
        for name, m in module.named_modules()
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS
    ]
    return tuple(max(lists, key=len)) if lists else ()


def prepare_finetune(
    model: nn.Module, config: ModelConfig, cfg: FinetuneConfig
) -> tuple[Backbone, ...]:
    """Apply gradient checkpointing, LoRA and the freeze policy to the model, in place.

    Returns its backbones, for the optimizer's learning rates.
    """
    parts = pretrained_parts(config)
    if not parts and (cfg.freeze != "none" or cfg.lora.enabled):
        key = "lora.enabled" if cfg.lora.enabled else "freeze"
        raise ConfigError(
            f"train.finetune.{key}: applies to pretrained backbones, and the model has none "
            "(set model.pretrained, model.vision_pretrained or model.text_pretrained)"
        )
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.lora.enabled:
        for part in parts:
            add_lora(model, part, cfg.lora)
    backbones = tuple(
        Backbone(part, getattr(model, part), find_blocks(getattr(model, part))) for part in parts
    )
    freeze(backbones, cfg)
    return backbones


def freeze(backbones: Sequence[Backbone], cfg: FinetuneConfig) -> None:
    """Stop gradients to the weights `cfg.freeze` holds fixed; none for `none`."""
    if cfg.freeze == "none":
        return
    for backbone in backbones:
        if cfg.freeze == "last_n" and not backbone.blocks:
            raise ConfigError(
                f"train.finetune.freeze: last_n needs the transformer blocks of "
                f"model.{backbone.part} and found none (no nn.ModuleList named "
                f"{' or '.join(BLOCK_LISTS)})"
            )
        # last_n: the top `trainable_blocks` blocks and what follows them (final norm,
        # projection) train; the embeddings never do.
        lowest = len(backbone.blocks) - cfg.trainable_blocks + 1
        for p, depth in backbone.depths().items():
            if cfg.freeze == "all" or depth < max(lowest, 1):
                p.requires_grad_(False)


def lr_groups(
    model: nn.Module, backbones: Sequence[Backbone], cfg: TrainConfig
) -> list[tuple[float, list[nn.Parameter]]]:
    """The model's trainable weights by learning rate, the head's (`train.lr`) first.

    Pretrained weights train at `train.finetune.backbone_lr`, times `layer_decay` per block
    below the top one; the embeddings one step lower still. LoRA adapters are new weights,
    like the head's, and train at its rate.
    """
    fine = cfg.finetune
    top = fine.backbone_lr if fine.backbone_lr is not None else cfg.lr * BACKBONE_LR_SCALE
    rates: dict[nn.Parameter, float] = {}
    for backbone in backbones:
        top_depth = len(backbone.blocks)
        for p, depth in backbone.depths().items():
            rates[p] = top * fine.layer_decay ** max(top_depth - depth, 0)
    groups: dict[float, list[nn.Parameter]] = {cfg.lr: []}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault(rates.get(p, cfg.lr), []).append(p)
    return [(lr, params) for lr, params in groups.items() if params]


def enable_checkpointing(model: nn.Module) -> list[str]:
    """Gradient checkpointing on every encoder that is, or holds, a transformers model that
    supports it; the encoders it was enabled on."""
    enabled = []
    for part in ENCODERS:
        roots = _checkpointable(getattr(model, part))
        for root in roots:
            # use_reentrant=False: the reentrant variant gives no gradient to a block whose
            # inputs need none, which is every block above frozen embeddings.
            kwargs = {"use_reentrant": False}
            if hasattr(root, "activation_checkpointing_enable"):  # transformers >= 5.x
                root.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                root.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if roots:
            enabled.append(part)
    if not enabled:
        raise ConfigError(
            "train.finetune.gradient_checkpointing: no encoder supports it (only transformers "
            "models do: a pretrained backbone, or model.vision.arch vit / model.text.arch bert)"
        )
    log.info("gradient checkpointing on the %s encoder(s)", " and ".join(enabled))
    return enabled


def checkpointing_enabled(encoder: nn.Module) -> bool:
    """Whether gradient checkpointing is on in the encoder's transformers model(s)."""
    roots = _checkpointable(encoder)
    flag = "is_activation_checkpointing"
    return bool(roots) and all(
        getattr(root, flag) if hasattr(root, flag) else root.is_gradient_checkpointing
        for root in roots
    )


def _checkpointable(encoder: nn.Module) -> list[nn.Module]:
    """The outermost transformers models in `encoder` that support gradient checkpointing."""
    return [m for m in _transformers_models(encoder) if m.supports_gradient_checkpointing]


def _transformers_models(encoder: nn.Module) -> list[nn.Module]:
    """The outermost transformers models inside `encoder`, itself included."""
    from transformers import PreTrainedModel

    roots: list[nn.Module] = []
    covered: set[nn.Module] = set()
    for module in encoder.modules():
        if isinstance(module, PreTrainedModel) and module not in covered:
            roots.append(module)
            covered.update(module.modules())
    return roots


def add_lora(model: nn.Module, part: str, cfg: LoraConfig) -> None:
    """LoRA adapters (peft) in the model's encoder `part`, in place; all its own weights frozen.

    peft wraps the transformers model(s) inside the encoder rather than the encoder: it takes
    any module with a transformers config for a transformers model, and a wrapper is not one.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    encoder = getattr(model, part)
    targets = lora_targets(encoder, cfg, part)
    for root in _transformers_models(encoder) or [encoder]:
        present = [name for name in targets if name in _linear_names(root)]
        if present:
            adapters = PeftLoraConfig(
                r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=present
            )
            with warnings.catch_warnings():
                # peft 0.21 asks transformers 5 for `is_gradient_checkpointing`, deprecated there.
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
                wrapped = get_peft_model(root, adapters)
            _swap(model, root, wrapped)
    # What the encoder holds beside its transformers model (a projection) stays fixed as well.
    for name, p in getattr(model, part).named_parameters():
        if ADAPTER_MARK not in name:
            p.requires_grad_(False)
    log.info("LoRA on model.%s: %s, rank %d", part, ", ".join(targets), cfg.r)


def _swap(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` where `old` is in the model."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise ValueError(f"{type(old).__name__} is not in the model")


def lora_targets(encoder: nn.Module, cfg: LoraConfig, part: str) -> list[str]:
    """The names of the encoder's linear layers to adapt: those configured that it has, or
    its attention query and value projections."""
    linear = _linear_names(encoder)
    if cfg.target_modules is not None:
        found = [name for name in cfg.target_modules if name in linear]
        if not found:
            raise ConfigError(
                f"train.finetune.lora.target_modules: none of {list(cfg.target_modules)} is a "
                f"linear layer of model.{part} (it has {sorted(linear)})"
            )
        return found
    for names in ATTENTION_PROJECTIONS:
        if set(names) <= linear:
            return list(names)
    raise ConfigError(
        f"train.finetune.lora.target_modules: cannot tell the attention projections of "
        f"model.{part}; name them (its linear layers: {sorted(linear)})"
    )


def _linear_names(module: nn.Module) -> set[str]:
    """The last name in the path of each linear layer in `module`."""
    # transformers' Conv1D (GPT-2 style) is a linear layer by another name; peft adapts both.
    return {
        name.rsplit(".", 1)[-1]
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
    }
