"""The training data: the train and val rows, their tokenizer, and the loaders over them."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from mmops.config import IMAGE_FORMATS, ImageLimits, ModelConfig, Params, TrainConfig
from mmops.data.dataset import DatasetError, load_splits
from mmops.data.images import is_unsafe_path
from mmops.model.backbones import from_pretrained
from mmops.model.image_processing import ImageSpec
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
    image_spec: ImageSpec  # how both preprocess images; the saved model keeps it


def load_rows(data_dir: Path, params: Params) -> TrainRows:
    """The dataset's train and val rows, and the labels seen in training; a row whose image
    validation would refuse for its path or size stops training here, before any epoch."""
    frame = load_splits(data_dir, params)
    train_rows = frame[frame["split"] == "train"]
    val_rows = frame[frame["split"] == "val"]
    check_images(data_dir, pd.concat([train_rows, val_rows]), params.validate.image)
    return TrainRows(train_rows, val_rows, sorted(train_rows["label"].unique()))


def check_images(data_dir: Path, rows: pd.DataFrame, limits: ImageLimits) -> None:
    """Raise DatasetError, naming the row and file, for an image outside the dataset (an
    absolute path, a `..`, a symlink out), missing, not PNG or JPEG, or over validation's file
    and pixel limits.

    Only headers are read: validation decodes every image, and this guards what it cannot, a
    run with `allow_unvalidated` or a file swapped since.
    """
    real_root = os.path.realpath(data_dir)
    for row_id, relpath in zip(rows["id"], rows["image"], strict=True):
        # isinstance, not "is not None": pandas may hold a missing image as NaN.
        problem = _image_problem(real_root, relpath, limits) if isinstance(relpath, str) else None
        if problem:
            raise DatasetError(f"{data_dir}: row {row_id!r}: image {relpath!r} {problem}")


def _image_problem(real_root: str, relpath: str, limits: ImageLimits) -> str | None:
    if "\0" in relpath:  # os.path raises on it rather than find no file
        return "holds a NUL byte"
    # The same containment as validation (mmops.data.images): the real path must stay inside.
    resolved = os.path.realpath(os.path.join(real_root, relpath))
    if is_unsafe_path(relpath) or not resolved.startswith(real_root + os.sep):
        return f"resolves outside the dataset ({resolved}); training reads only files inside it"
    try:
        size = os.stat(resolved).st_size
        if size > limits.max_file_mb * 2**20:
            mib = size / 2**20
            return f"is {mib:.1f} MiB, over validate.image.max_file_mb {limits.max_file_mb}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # The header only: no pixel is decoded, and no decoder but PNG's and JPEG's runs.
            with Image.open(resolved, formats=IMAGE_FORMATS) as image:
                width, height, found = *image.size, image.format
    except FileNotFoundError:
        return "not found"
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        return f"cannot be opened as {' or '.join(IMAGE_FORMATS)}: {exc}"
    if found not in IMAGE_FORMATS:  # a multi-picture JPEG opens as MPO
        return f"is {found}, not {' or '.join(IMAGE_FORMATS)}"
    if width * height > limits.max_pixels:
        return (
            f"is {width}x{height} = {width * height} pixels, over validate.image.max_pixels "
            f"{limits.max_pixels}"
        )
    if max(width, height) > limits.max_side:
        return f"is {width}x{height}, a side over validate.image.max_side {limits.max_side}"
    return None


def build_tokenizer(mcfg: ModelConfig, texts: pd.Series) -> Any:
    """The pretrained text model's tokenizer, or one trained on the train texts."""
    named = mcfg.checkpoint("text")
    if named is not None:
        from transformers import AutoTokenizer

        return from_pretrained(*named, AutoTokenizer.from_pretrained)
    return train_tokenizer(
        (t for t in texts if isinstance(t, str)), mcfg.vocab_size, mcfg.max_text_length
    )


def build_loaders(
    data_dir: Path,
    rows: TrainRows,
    tokenizer: Any,
    params: Params,
    runtime: Runtime,
    spec: ImageSpec,
) -> TrainLoaders:
    """A shuffling, sharded train loader and a plain val loader, images preprocessed by `spec`
    (`image_spec_for` the model)."""
    cfg, mcfg = params.train, params.model
    label_index = {label: i for i, label in enumerate(rows.labels)}
    collate = Collator(tokenizer, spec, mcfg.max_text_length, mcfg.text_padding)
    limit = params.validate.image.max_pixels
    train_set = MultimodalDataset(data_dir, rows.train, label_index, spec, max_pixels=limit)
    val_set = MultimodalDataset(data_dir, rows.val, label_index, spec, max_pixels=limit)
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
        image_spec=spec,
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
