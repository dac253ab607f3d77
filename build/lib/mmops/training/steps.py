"""One optimisation step, one pass over the train loader, and the loss on a held-out loader."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mmops.config import TrainConfig
from mmops.model.classifier import contrastive_loss
from mmops.model.preprocess import model_inputs
from mmops.training.runtime import Runtime, autocast


@dataclass(frozen=True)
class LossAccuracy:
    loss: float
    accuracy: float


def train_epoch(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    runtime: Runtime,
) -> LossAccuracy:
    """One pass over the batches, a step and a schedule step each; mean train loss and accuracy."""
    model.train()
    # Sums stay on the device and are read once per epoch: an .item() per step would make
    # the CPU wait for the GPU every step.
    total_loss = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    seen = 0
    for batch in batches:
        inputs = model_inputs(batch, runtime.device)
        labels = batch["labels"].to(runtime.device, non_blocking=True)
        loss, logits = train_step(model, inputs, labels, optimizer, cfg, runtime)
        scheduler.step()
        total_loss += loss * len(labels)
        correct += (logits.argmax(-1) == labels).sum()
        seen += len(labels)
    return LossAccuracy(total_loss.item() / seen, correct.item() / seen)


def train_step(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    runtime: Runtime,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch already on the device; returns (loss, logits), detached."""
    inputs = {**inputs, "pixel_values": augment(inputs["pixel_values"], cfg.augment)}
    with autocast(runtime):
        output = model(**inputs)
        loss = cfg.classification_weight * F.cross_entropy(output.logits.float(), labels)
        if cfg.contrastive_weight > 0:
            pairs = inputs["image_present"] & inputs["text_present"]
            loss = loss + cfg.contrastive_weight * contrastive_loss(output, pairs)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach().float(), output.logits.detach()


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, loader: DataLoader, runtime: Runtime) -> LossAccuracy:
    """Mean cross-entropy and accuracy over a loader."""
    model.eval()
    total_loss = correct = seen = 0.0
    for batch in loader:
        labels = batch["labels"].to(runtime.device)
        with autocast(runtime):
            logits = model(**model_inputs(batch, runtime.device)).logits.float()
        known = labels >= 0
        if known.any():
            total_loss += F.cross_entropy(logits[known], labels[known], reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        seen += len(labels)
    return LossAccuracy(total_loss / max(seen, 1), correct / max(seen, 1))


# Pixel noise of `noise` augmentation: a tenth of the pixel range ([-1, 1] here) as std.
NOISE_STD = 0.2


def augment(pixels: torch.Tensor, mode: str) -> torch.Tensor:
    """Gaussian pixel noise, or random flips (and 90-degree turns), per image, on the device.

    Drawn from the main process's torch RNG, which is seeded per epoch: a resumed run sees the
    same augmented images as an uninterrupted one, whatever the DataLoader workers do.
    """
    if mode == "none":
        return pixels
    if mode == "noise":
        noise = torch.randn(pixels.shape, dtype=pixels.dtype).to(pixels.device)
        return pixels + NOISE_STD * noise
    n = pixels.shape[0]
    flip = torch.rand(n) < 0.5
    pixels = torch.where(flip.to(pixels.device)[:, None, None, None], pixels.flip(-1), pixels)
    if mode == "flip_rotate":
        turns = torch.randint(0, 4, (n,))
        out = pixels.clone()
        for k in (1, 2, 3):
            chosen = (turns == k).nonzero().flatten().to(pixels.device)
            out[chosen] = torch.rot90(pixels[chosen], k, dims=(-2, -1))
        pixels = out
    return pixels
