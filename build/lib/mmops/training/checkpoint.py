"""The checkpoint written after every epoch, from which an interrupted run resumes."""

from __future__ import annotations

import os
import pickle
from dataclasses import asdict
from pathlib import Path

import torch

from mmops.training.progress import TrainProgress

CHECKPOINT_FILE = "checkpoint.pt"
_PARTS = ("model", "optimizer", "scheduler", "state")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be resumed from; the message names the file."""


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: TrainProgress,
) -> None:
    """Model, optimizer, schedule and progress after the last finished epoch.

    Only tensors, dicts, lists and numbers, so `load_checkpoint` reads it with `weights_only`.
    """
    partial = path.with_name(f"{path.name}.partial")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": asdict(progress),
        },
        partial,
    )
    # A run killed while saving keeps the previous epoch's checkpoint, never half of one.
    os.replace(partial, path)


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> TrainProgress:
    """Restore model, optimizer and schedule in place; returns the progress they were saved at."""
    # weights_only: unpickling may build tensors and plain containers only, never run code, so
    # a checkpoint file planted in the output folder cannot execute anything on resume.
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused, not a checkpoint of tensors and plain values only "
            f"({_unpickler_detail(error)}); delete it, or train without --resume"
        ) from None
    except (RuntimeError, EOFError) as error:  # not a zip archive, or cut short
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({error}); delete it or train without --resume"
        ) from None
    missing = [part for part in _PARTS if not isinstance(saved, dict) or part not in saved]
    if missing:
        raise CheckpointError(f"{path}: not an mmops checkpoint (no {', '.join(missing)})")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return TrainProgress.from_dict(saved["state"])


def _unpickler_detail(error: pickle.UnpicklingError) -> str:
    # torch's message is advice on loading it anyway; only the unpickler's own line says why.
    _, found, rest = str(error).partition("WeightsUnpickler error:")
    return rest.strip().split("\n\n")[0].split(". ")[0] if found else "not a checkpoint"
