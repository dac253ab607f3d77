"""The checkpoint written after every epoch, from which an interrupted run resumes."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from mmops.training.progress import TrainProgress

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: TrainProgress,
) -> None:
    """Model, optimizer, schedule and progress after the last finished epoch."""
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": asdict(progress),
        },
        path,
    )


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> TrainProgress:
    """Restore model, optimizer and schedule in place; returns the progress they were saved at."""
    saved = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return TrainProgress.from_dict(saved["state"])
