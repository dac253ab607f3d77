"""AdamW with decoupled decay on weight matrices, a learning rate per part of the model (head,
pretrained backbone blocks), and a linear-warmup cosine schedule per step."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mmops.config import TrainConfig
from mmops.training.finetune import Backbone, lr_groups
from mmops.training.runtime import Runtime


def build_optimizer(
    model: torch.nn.Module,
    cfg: TrainConfig,
    steps_per_epoch: int,
    runtime: Runtime,
    backbones: Sequence[Backbone] = (),
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer and its schedule over all `cfg.epochs`, stepped once per batch.

    The pretrained `backbones` train at their own rates (`train.finetune`); the schedule scales
    every group's rate alike, so the head's group comes first and is the one logged as `lr`.
    """
    groups = [
        {**group, "lr": lr}
        for lr, params in lr_groups(model, backbones, cfg)
        for group in param_groups(params, cfg.weight_decay)
        if group["params"]
    ]
    optimizer = torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        fused=runtime.device.type == "cuda",
    )
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(round(cfg.warmup_ratio * total_steps), total_steps)
    )
    return optimizer, scheduler


def param_groups(params: Sequence[torch.nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Parameters split into decayed (matrices) and undecayed (vectors) groups."""
    # No decay on biases, norms and embeddings-like vectors: the usual AdamW practice.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor at a step: linear up over `warmup`, then cosine down to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def step_budget(cfg: TrainConfig, steps_per_epoch: int) -> TrainConfig:
    """`cfg` with epochs, and patience in proportion, raised to reach `cfg.min_steps` steps.

    Epochs alone are the wrong unit across dataset sizes: 30 epochs of 300 rows are 240 steps,
    too few to learn anything (measured: test accuracy 0.29, the baseline 0.46), while the
    same 30 epochs of 2,000 rows are 1,500.
    """
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / max(1, steps_per_epoch)))
    patience = math.ceil(cfg.early_stopping_patience * epochs / cfg.epochs)
    return dataclasses.replace(cfg, epochs=epochs, early_stopping_patience=patience)
