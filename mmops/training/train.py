"""Training: a plain torch loop, from one CPU to many GPUs under `torchrun` with no code change.

Imports neither mlflow, prefect nor dvc: tracking plugs in through the `Tracker` protocol, so the
same loop runs on a bare GPU machine.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from mmops.config import Params
from mmops.data.dataset import load_splits
from mmops.model.classifier import (
    MultimodalClassifier,
    build_encoders,
    contrastive_loss,
    count_parameters,
)
from mmops.model.preprocess import Collator, MultimodalDataset, model_inputs, train_tokenizer
from mmops.model.storage import save_model

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_DIR = "model"
HISTORY_FILE = "history.json"


class Tracker(Protocol):
    """Where per-epoch metrics go (MLflow in the CLI; nothing on a bare GPU machine)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


@dataclass
class TrainResult:
    model_dir: Path
    labels: list[str]
    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    stopped_early: bool
    device: str
    world_size: int
    parameters: int
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model_dir": str(self.model_dir)}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    autocast_dtype: torch.dtype | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def train(
    data_dir: Path | str,
    params: Params,
    out_dir: Path | str | None = None,
    tracker: Tracker | None = None,
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train on the dataset's train split, early-stop on val accuracy, save the best model."""
    cfg = params.train
    out = Path(out_dir or cfg.out_dir)
    runtime = setup_runtime(cfg.device, cfg.precision)
    try:
        return _train(Path(data_dir), params, out, runtime, tracker, resume, progress)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def setup_runtime(device: str, precision: str) -> Runtime:
    """Device, rank and precision; joins the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    bf16 = precision == "bf16" or (precision == "auto" and use_cuda)
    return Runtime(torch_device, rank, world_size, torch.bfloat16 if bf16 else None)


def _train(
    data_dir: Path,
    params: Params,
    out: Path,
    runtime: Runtime,
    tracker: Tracker | None,
    resume: bool,
    progress: bool,
) -> TrainResult:
    from tqdm.auto import tqdm

    cfg, mcfg = params.train, params.model
    torch.manual_seed(cfg.seed)
    frame = load_splits(data_dir, params)
    train_rows = frame[frame["split"] == "train"]
    val_rows = frame[frame["split"] == "val"]
    labels = sorted(train_rows["label"].unique())
    label_index = {label: i for i, label in enumerate(labels)}

    tokenizer = _tokenizer(mcfg, train_rows["text"])
    vision, text = build_encoders(mcfg, vocab_size=len(tokenizer))
    model = MultimodalClassifier(mcfg, len(labels), vision, text).to(runtime.device)
    # Without a contrastive term the temperature gets no gradient, which DDP would reject.
    model.logit_scale.requires_grad_(cfg.contrastive_weight > 0)
    parameters = count_parameters(model)

    collate = Collator(tokenizer, mcfg.image_size, mcfg.max_text_length)
    train_set = MultimodalDataset(data_dir, train_rows, label_index, mcfg.image_size)
    val_set = MultimodalDataset(data_dir, val_rows, label_index, mcfg.image_size)
    # A sampler even on one process: the shuffle order is then a function of (seed, epoch) only,
    # which is what makes a resumed run repeat an uninterrupted one.
    sampler = DistributedSampler(
        train_set, num_replicas=runtime.world_size, rank=runtime.rank, seed=cfg.seed
    )
    train_loader = _loader(train_set, cfg, collate, runtime, sampler)
    val_loader = _loader(val_set, cfg, collate, runtime, None)

    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        fused=runtime.device.type == "cuda",
    )
    total_steps = cfg.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(round(cfg.warmup_ratio * total_steps), total_steps)
    )

    state = {
        "epoch": 0,
        "best_val_accuracy": -1.0,
        "best_val_loss": math.inf,
        "best_epoch": 0,
        "bad_epochs": 0,
        "history": [],
    }
    checkpoint = out / CHECKPOINT_FILE
    if resume and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=runtime.device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        log.info("resumed from %s after epoch %d", checkpoint, state["epoch"])

    step_model: torch.nn.Module = model
    if runtime.world_size > 1:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        step_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        step_model = torch.compile(step_model)

    patience = cfg.early_stopping_patience
    # A run that stopped early stays stopped when resumed.
    stopped_early = bool(patience) and state["bad_epochs"] >= patience
    epochs = tqdm(
        range(state["epoch"], state["epoch"] if stopped_early else cfg.epochs),
        desc="epochs",
        initial=state["epoch"],
        total=cfg.epochs,
        disable=not (progress and runtime.is_main),
    )
    for epoch in epochs:
        # Seeding per epoch makes dropout and modality dropout independent of what ran before.
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        train_metrics = _train_epoch(
            step_model,
            train_loader,
            optimizer,
            scheduler,
            cfg,
            runtime,
            tqdm(
                train_loader,
                desc=f"epoch {epoch + 1}",
                leave=False,
                disable=not (progress and runtime.is_main),
            ),
        )
        seconds = time.perf_counter() - start
        val_metrics = evaluate_loss(model, val_loader, runtime)
        metrics = {
            **train_metrics,
            "val_loss": val_metrics["loss"],
            "val_accuracy": val_metrics["accuracy"],
            "lr": scheduler.get_last_lr()[0],
            "epoch_seconds": seconds,
            "train_samples_per_s": len(train_set) / seconds,
        }
        state["history"].append({"epoch": epoch + 1, **metrics})
        if runtime.is_main:
            log.info(
                "epoch %d/%d: train loss %.4f acc %.4f, val loss %.4f acc %.4f, %.1fs",
                epoch + 1,
                cfg.epochs,
                metrics["train_loss"],
                metrics["train_accuracy"],
                metrics["val_loss"],
                metrics["val_accuracy"],
                seconds,
            )
        state["epoch"] = epoch + 1
        improved = metrics["val_accuracy"] > state["best_val_accuracy"] or (
            metrics["val_accuracy"] == state["best_val_accuracy"]
            and metrics["val_loss"] < state["best_val_loss"]
        )
        if improved:
            state.update(
                best_val_accuracy=metrics["val_accuracy"],
                best_val_loss=metrics["val_loss"],
                best_epoch=epoch + 1,
                bad_epochs=0,
            )
        else:
            state["bad_epochs"] += 1
        if runtime.is_main:
            if improved:
                extra = {"contrastive": cfg.contrastive_weight > 0, "trained_epochs": epoch + 1}
                save_model(model, tokenizer, labels, out / MODEL_DIR, extra)
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "state": state,
                },
                checkpoint,
            )
            if tracker is not None:
                tracker.log_metrics(metrics, step=epoch + 1)
            epochs.set_postfix(
                val_acc=f"{metrics['val_accuracy']:.3f}", loss=f"{metrics['train_loss']:.3f}"
            )
        if runtime.world_size > 1:
            dist.barrier()
        if patience and state["bad_epochs"] >= patience and epoch + 1 < cfg.epochs:
            stopped_early = True
            log.info("early stop after epoch %d: no val gain in %d epochs", epoch + 1, patience)
            break

    result = TrainResult(
        model_dir=out / MODEL_DIR,
        labels=labels,
        best_epoch=state["best_epoch"],
        best_val_accuracy=state["best_val_accuracy"],
        epochs_run=state["epoch"],
        stopped_early=stopped_early,
        device=str(runtime.device),
        world_size=runtime.world_size,
        parameters=parameters,
        history=state["history"],
    )
    if runtime.is_main:
        (out / HISTORY_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _train_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: Any,
    runtime: Runtime,
    batches: Any,
) -> dict[str, float]:
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
    return {"train_loss": total_loss.item() / seen, "train_accuracy": correct.item() / seen}


def train_step(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    cfg: Any,
    runtime: Runtime,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch already on the device; returns (loss, logits), detached."""
    inputs = {**inputs, "pixel_values": augment(inputs["pixel_values"], cfg.augment)}
    with _autocast(runtime):
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
def evaluate_loss(model: torch.nn.Module, loader: DataLoader, runtime: Runtime) -> dict[str, float]:
    """Mean cross-entropy and accuracy over a loader."""
    model.eval()
    total_loss = correct = seen = 0.0
    for batch in loader:
        labels = batch["labels"].to(runtime.device)
        with _autocast(runtime):
            logits = model(**model_inputs(batch, runtime.device)).logits.float()
        known = labels >= 0
        if known.any():
            total_loss += F.cross_entropy(logits[known], labels[known], reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        seen += len(labels)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1)}


def augment(pixels: torch.Tensor, mode: str) -> torch.Tensor:
    """Random flips (and 90-degree turns) per image, on the device.

    Drawn from the main process's torch RNG, which is seeded per epoch: a resumed run sees the
    same augmented images as an uninterrupted one, whatever the DataLoader workers do.
    """
    if mode == "none":
        return pixels
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


def _autocast(runtime: Runtime) -> Any:
    if runtime.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(runtime.device.type, dtype=runtime.autocast_dtype)


def _loader(
    dataset: MultimodalDataset,
    cfg: Any,
    collate: Collator,
    runtime: Runtime,
    sampler: DistributedSampler | None,
) -> DataLoader:
    workers = cfg.num_workers
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=runtime.device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # Workers start from a clean server process, not a fork of this one: under an
        # orchestrator (Prefect, MLflow system metrics) this process has threads and handlers
        # that a forked worker inherits half-working and trips over when it exits.
        multiprocessing_context="forkserver" if workers > 0 else None,
        # The loader draws worker seeds from its own generator, never from the global RNG that
        # dropout and augmentation use: the result does not depend on the number of workers.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def _tokenizer(mcfg: Any, texts: pd.Series) -> Any:
    if mcfg.text_pretrained:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(mcfg.text_pretrained)
    return train_tokenizer(
        (t for t in texts if isinstance(t, str)), mcfg.vocab_size, mcfg.max_text_length
    )


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on biases, norms and embeddings-like vectors: the usual AdamW practice.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _warmup_cosine(warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor
