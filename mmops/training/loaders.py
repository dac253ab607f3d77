"""The training data: the train and val rows, their tokenizer, and the loaders over them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler

from mmops.config import ModelConfig, Params, TrainConfig
from mmops.data.dataset import load_splits
from mmops.model.preprocess import Collator, MultimodalDataset, train_tokenizer
from mmops.training.runtime import Runtime


@dataclass(frozen=True)
class TrainRows:
    train: pd.DataFrame
    val: pd.DataFrame
    labels: list[str]  # sorted; a label's index is its class id


@dataclass(frozen=True)
class TrainLoaders:
    train: DataLoader
    val: DataLoader
    sampler: DistributedSampler  # the train loader's; `set_epoch` reshuffles it
    train_size: int  # examples in this process's train set


def load_rows(data_dir: Path, params: Params) -> TrainRows:
    """The dataset's train and val rows, and the labels seen in training."""
    frame = load_splits(data_dir, params)
    train_rows = frame[frame["split"] == "train"]
    val_rows = frame[frame["split"] == "val"]
    return TrainRows(train_rows, val_rows, sorted(train_rows["label"].unique()))


def build_tokenizer(mcfg: ModelConfig, texts: pd.Series) -> Any:
    """The pretrained text model's tokenizer, or one trained on the train texts."""
    if mcfg.text_pretrained:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(mcfg.text_pretrained)
    return train_tokenizer(
        (t for t in texts if isinstance(t, str)), mcfg.vocab_size, mcfg.max_text_length
    )


def build_loaders(
    data_dir: Path, rows: TrainRows, tokenizer: Any, params: Params, runtime: Runtime
) -> TrainLoaders:
    """A shuffling, sharded train loader and a plain val loader."""
    cfg, mcfg = params.train, params.model
    label_index = {label: i for i, label in enumerate(rows.labels)}
    collate = Collator(tokenizer, mcfg.image_size, mcfg.max_text_length)
    train_set = MultimodalDataset(data_dir, rows.train, label_index, mcfg.image_size)
    val_set = MultimodalDataset(data_dir, rows.val, label_index, mcfg.image_size)
    # A sampler even on one process: the shuffle order is then a function of (seed, epoch) only,
    # which is what makes a resumed run repeat an uninterrupted one.
    sampler = DistributedSampler(
        train_set, num_replicas=runtime.world_size, rank=runtime.rank, seed=cfg.seed
    )
    return TrainLoaders(
        train=make_loader(train_set, cfg, collate, runtime, sampler),
        val=make_loader(val_set, cfg, collate, runtime, None),
        sampler=sampler,
        train_size=len(train_set),
    )


def make_loader(
    dataset: MultimodalDataset,
    cfg: TrainConfig,
    collate: Collator,
    runtime: Runtime,
    sampler: DistributedSampler | None,
) -> DataLoader:
    """Batches in the sampler's order (or the dataset's), decoded in `cfg.num_workers` workers."""
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
