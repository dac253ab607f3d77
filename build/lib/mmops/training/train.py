"""Training: a plain torch loop, from one CPU to many GPUs under `torchrun` with no code change.

Imports neither mlflow, prefect nor dvc: tracking plugs in through the `Tracker` protocol, so the
same loop runs on a bare GPU machine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mmops.config import ModelConfig, Params, TrainConfig
from mmops.model.backbones import with_text_padding
from mmops.model.classifier import MultimodalClassifier, build_encoders, count_parameters
from mmops.model.image_processing import ImageSpec, image_spec_for
from mmops.model.storage import save_model
from mmops.training.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from mmops.training.finetune import ADAPTER_MARK, Backbone, prepare_finetune
from mmops.training.history import HISTORY_CSV_FILE, HISTORY_FILE, write_history
from mmops.training.loaders import (
    TrainLoaders,
    build_loaders,
    build_tokenizer,
    load_rows,
)
from mmops.training.optim import build_optimizer, step_budget
from mmops.training.progress import Tracker, TrainProgress, TrainResult, chance_floor
from mmops.training.runtime import Runtime, barrier, setup_runtime, shutdown_runtime
from mmops.training.steps import evaluate_loss, train_epoch, train_step
from mmops.training.validation_gate import DataValidation, require_validation

# Names other modules import from here, wherever they now live.
__all__ = [
    "CHECKPOINT_FILE",
    "HISTORY_CSV_FILE",
    "HISTORY_FILE",
    "MODEL_DIR",
    "Runtime",
    "Tracker",
    "TrainProgress",
    "TrainResult",
    "setup_runtime",
    "train",
    "train_step",
]

log = logging.getLogger(__name__)

MODEL_DIR = "model"


@dataclass
class _Run:
    """Everything the epoch loop reads and advances."""

    cfg: TrainConfig
    runtime: Runtime
    out: Path
    tracker: Tracker | None
    model: MultimodalClassifier
    step_model: torch.nn.Module  # the model as train steps call it: DDP-wrapped, compiled
    tokenizer: Any
    labels: list[str]
    loaders: TrainLoaders
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    progress: TrainProgress


def train(
    data_dir: Path | str,
    params: Params,
    out_dir: Path | str | None = None,
    tracker: Tracker | None = None,
    resume: bool = True,
    progress: bool = True,
    validation: DataValidation | None = None,
) -> TrainResult:
    """Train on the dataset's train split, early-stop on val accuracy, save the best model.

    Only data that passed validation at its exact version: without `validation` (what
    `require_validation` returned), the report at `train.validation_report` must vouch for it.
    """
    cfg = params.train
    if validation is None:
        validation = require_validation(data_dir, cfg.validation_report)
    out = Path(out_dir or cfg.out_dir)
    runtime = setup_runtime(cfg.device, cfg.precision)
    try:
        return _train(Path(data_dir), params, out, runtime, tracker, resume, progress, validation)
    finally:
        shutdown_runtime()


def _train(
    data_dir: Path,
    params: Params,
    out: Path,
    runtime: Runtime,
    tracker: Tracker | None,
    resume: bool,
    show_progress: bool,
    validation: DataValidation,
) -> TrainResult:
    cfg = params.train
    # The model's initial weights are drawn from this seed.
    torch.manual_seed(cfg.seed)
    params, spec = _with_checkpoint_inputs(params)
    rows = load_rows(data_dir, params)
    tokenizer = build_tokenizer(params.model, rows.train["text"])
    model, backbones = build_model(params.model, cfg, len(rows.labels), len(tokenizer), runtime)
    loaders = build_loaders(data_dir, rows, tokenizer, params, runtime, spec)
    cfg = step_budget(cfg, len(loaders.train))
    optimizer, scheduler = build_optimizer(model, cfg, len(loaders.train), runtime, backbones)

    progress = TrainProgress(floor=chance_floor(loaders.val.dataset.labels))
    checkpoint = out / CHECKPOINT_FILE
    if resume and checkpoint.is_file():
        progress = load_checkpoint(checkpoint, model, optimizer, scheduler, runtime.device)
        log.info("resumed from %s after epoch %d", checkpoint, progress.epoch)

    step_model = wrap_for_steps(model, cfg, runtime)
    run = _Run(
        cfg=cfg,
        runtime=runtime,
        out=out,
        tracker=tracker,
        model=model,
        step_model=step_model,
        tokenizer=tokenizer,
        labels=rows.labels,
        loaders=loaders,
        optimizer=optimizer,
        scheduler=scheduler,
        progress=progress,
    )
    stopped_early = _run_epochs(run, show_progress)

    result = TrainResult(
        model_dir=out / MODEL_DIR,
        labels=rows.labels,
        best_epoch=progress.best_epoch,
        best_val_accuracy=progress.best_val_accuracy,
        epochs_run=progress.epoch,
        stopped_early=stopped_early,
        device=str(runtime.device),
        world_size=runtime.world_size,
        parameters=count_parameters(model, skip=ADAPTER_MARK),  # as saved: adapters merged
        history=progress.history,
        validation=validation.to_dict(),
    )
    if runtime.is_main:
        write_history(out, result)
    return result


def _with_checkpoint_inputs(params: Params) -> tuple[Params, ImageSpec]:
    """The params with the image size the model takes and its text padding, and its image
    preprocessing: a checkpoint's image processor and text tower set them, not model.image_size
    or model.max_text_length."""
    spec = image_spec_for(params.model)
    model = with_text_padding(replace(params.model, image_size=spec.image_size))
    return replace(params, model=model), spec


def build_model(
    mcfg: ModelConfig, cfg: TrainConfig, num_labels: int, vocab_size: int, runtime: Runtime
) -> tuple[MultimodalClassifier, tuple[Backbone, ...]]:
    """A freshly initialised classifier on the runtime's device, prepared for fine-tuning as
    `train.finetune` says (frozen weights, LoRA adapters); and its pretrained backbones."""
    vision, text = build_encoders(mcfg, vocab_size=vocab_size)
    model = MultimodalClassifier(mcfg, num_labels, vision, text)
    backbones = prepare_finetune(model, mcfg, cfg.finetune)
    model = model.to(runtime.device)
    # Without a contrastive term the temperature gets no gradient, which DDP would reject.
    model.logit_scale.requires_grad_(cfg.contrastive_weight > 0)
    return model, backbones


def wrap_for_steps(model: torch.nn.Module, cfg: TrainConfig, runtime: Runtime) -> torch.nn.Module:
    """The model as the train steps call it: DDP across processes, compiled if asked."""
    step_model = model
    if runtime.world_size > 1:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        step_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        step_model = torch.compile(step_model)
    return step_model


def _run_epochs(run: _Run, show_progress: bool) -> bool:
    """Train from the run's next epoch to its last or to early stopping; True if it stopped."""
    from tqdm.auto import tqdm

    cfg, done = run.cfg, run.progress.epoch
    patience = cfg.early_stopping_patience
    show = show_progress and run.runtime.is_main
    # A run that stopped early stays stopped when resumed.
    stopped_early = run.progress.out_of_patience(patience)
    epochs = tqdm(
        range(done, done if stopped_early else cfg.epochs),
        desc="epochs",
        initial=done,
        total=cfg.epochs,
        disable=not show,
    )
    for epoch in epochs:
        metrics = _run_epoch(run, epoch, show)
        _end_epoch(run, metrics)
        epochs.set_postfix(
            val_acc=f"{metrics['val_accuracy']:.3f}", loss=f"{metrics['train_loss']:.3f}"
        )
        barrier(run.runtime)
        if run.progress.out_of_patience(patience) and epoch + 1 < cfg.epochs:
            log.info("early stop after epoch %d: no val gain in %d epochs", epoch + 1, patience)
            return True
    return stopped_early


def _run_epoch(run: _Run, epoch: int, show: bool) -> dict[str, float]:
    """Train epoch `epoch` (0-based) and score it on val: its metrics for history and tracker."""
    from tqdm.auto import tqdm

    # Seeding per epoch makes dropout and modality dropout independent of what ran before.
    torch.manual_seed(run.cfg.seed * 100_003 + epoch)
    run.loaders.sampler.set_epoch(epoch)
    start = time.perf_counter()
    batches = tqdm(run.loaders.train, desc=f"epoch {epoch + 1}", leave=False, disable=not show)
    fit = train_epoch(run.step_model, batches, run.optimizer, run.scheduler, run.cfg, run.runtime)
    seconds = time.perf_counter() - start
    val = evaluate_loss(run.model, run.loaders.val, run.runtime)
    return {
        "train_loss": fit.loss,
        "train_accuracy": fit.accuracy,
        "val_loss": val.loss,
        "val_accuracy": val.accuracy,
        "lr": run.scheduler.get_last_lr()[0],
        "epoch_seconds": seconds,
        "train_samples_per_s": run.loaders.train_size / seconds,
    }


def _end_epoch(run: _Run, metrics: dict[str, float]) -> None:
    """Record the epoch; the main process saves the model if best, the checkpoint, and reports."""
    improved = run.progress.record(metrics)
    if not run.runtime.is_main:
        return
    epoch = run.progress.epoch
    log.info(
        "epoch %d/%d: train loss %.4f acc %.4f, val loss %.4f acc %.4f, %.1fs",
        epoch,
        run.cfg.epochs,
        metrics["train_loss"],
        metrics["train_accuracy"],
        metrics["val_loss"],
        metrics["val_accuracy"],
        metrics["epoch_seconds"],
    )
    if improved:
        extra = {"contrastive": run.cfg.contrastive_weight > 0, "trained_epochs": epoch}
        save_model(
            run.model, run.tokenizer, run.labels, run.out / MODEL_DIR, extra, run.loaders.image_spec
        )
    save_checkpoint(
        run.out / CHECKPOINT_FILE, run.model, run.optimizer, run.scheduler, run.progress
    )
    if run.tracker is not None:
        run.tracker.log_metrics(metrics, step=epoch)
