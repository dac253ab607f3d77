"""Speed and size of a model on the serving path: latency, throughput, memory, parameters."""

from __future__ import annotations

import resource

import torch

from mmops.evaluation.records import Efficiency
from mmops.model.classifier import count_parameters
from mmops.model.preprocess import MultimodalDataset
from mmops.model.storage import WEIGHTS_FILE
from mmops.serving.predictor import Predictor
from mmops.serving.runners import cycled_batch, measure_latency


@torch.no_grad()
def efficiency(
    predictor: Predictor, dataset: MultimodalDataset, batch_sizes: tuple[int, ...], repeats: int
) -> Efficiency:
    """Latency p50/p95 per batch size, throughput, peak memory, parameters, size."""
    loaded = predictor.loaded
    device = next(loaded.model.parameters()).device
    latency = {
        str(bs): measure_latency(
            predictor.runner, cycled_batch(predictor.collate, dataset, bs), repeats
        )
        for bs in batch_sizes
    }
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # the whole process's peak resident memory; Linux reports KiB
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    weights = loaded.folder / WEIGHTS_FILE
    return Efficiency(
        device=str(device),
        backend=predictor.backend,
        latency=latency,
        peak_memory_mb=float(peak_mb),
        parameters=count_parameters(loaded.model),
        model_size_mb=weights.stat().st_size / 2**20,
    )
