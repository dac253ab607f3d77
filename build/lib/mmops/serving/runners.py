"""What runs a collated batch: an exported ONNX model (or the torch model), and how fast.

A batch maps the model's input names to arrays (numpy, or torch tensors from training's
collator). The torch runner lives in `mmops.serving.torch_runner`, imported only when the torch
backend serves, so the ONNX backends run in an install without torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

EXPORT_FILE = "export.json"


ONNX_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
EMBEDS_SUFFIX = "_embeds"


class Outputs(NamedTuple):
    probs: np.ndarray  # (n, classes)
    # (n, width) per modality name (image, text, and fused: what the head reads), L2-normalised
    embeds: dict[str, np.ndarray]


def embeds_by_modality(named: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`{modality: array}` from arrays named `<modality>_embeds` (the model's output names)."""
    return {
        name.removesuffix(EMBEDS_SUFFIX): np.asarray(value)
        for name, value in named.items()
        if name.endswith(EMBEDS_SUFFIX)
    }


class OnnxRunner:
    """Runs an exported ONNX model (FP32 or INT8) with ONNX Runtime on a collated batch."""

    def __init__(self, path: Path, name: str, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = [
            p
            for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in ort.get_available_providers()
        ]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        # Models exported before the fused embedding have only the image and text ones.
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.name = name

    def __call__(self, batch: Mapping[str, Any]) -> Outputs:
        feeds = {name: np.asarray(batch[name]) for name in self.inputs}
        values = dict(zip(self.outputs, self.session.run(None, feeds), strict=True))
        return Outputs(values.pop("probs"), embeds_by_modality(values))


class Runner(Protocol):
    """What a backend is: a name, and outputs for a collated batch."""

    name: str

    def __call__(self, batch: Mapping[str, Any]) -> Outputs: ...


def run_loader(
    runner: Runner, batches: Iterable[Mapping[str, Any]], num_labels: int = 0
) -> Outputs:
    """A runner's outputs over collated batches, concatenated in order."""
    parts = [runner(batch) for batch in batches]
    if not parts:
        return Outputs(np.zeros((0, num_labels)), {})
    return Outputs(
        np.concatenate([part.probs for part in parts]),
        {name: np.concatenate([part.embeds[name] for part in parts]) for name in parts[0].embeds},
    )


# Seconds one latency figure may take once it has MIN_TIMINGS: a ViT-B/32 at batch 32 takes
# about 10 s a call on 2 cores, where 20 repeats of 3 backends at 3 batch sizes took 10 minutes.
LATENCY_BUDGET_S = 20.0
MIN_TIMINGS = 3


def measure_latency(runner: Runner, batch: Mapping[str, Any], repeats: int) -> dict[str, float]:
    """p50/p95 milliseconds of one batch through `runner`, and examples per second at p50:
    `repeats` timings, or fewer (at least MIN_TIMINGS) once LATENCY_BUDGET_S is spent."""
    warm_up = time.perf_counter()
    for _ in range(3):  # warm-up: first calls allocate and pick kernels
        runner(batch)
        if time.perf_counter() - warm_up > LATENCY_BUDGET_S / 4:
            break
    times: list[float] = []
    started = time.perf_counter()
    for _ in range(repeats):
        start = time.perf_counter()
        runner(batch)  # outputs come back as numpy: GPU work has finished when it returns
        times.append((time.perf_counter() - start) * 1000)
        spent = time.perf_counter() - started
        if len(times) >= MIN_TIMINGS and spent > LATENCY_BUDGET_S:
            break
    p50 = float(np.percentile(times, 50))
    return {
        "p50_ms": p50,
        "p95_ms": float(np.percentile(times, 95)),
        "throughput_per_s": len(batch["pixel_values"]) / (p50 / 1000),
    }


def cycled_batch(
    collate: Callable[[list[Any]], dict[str, Any]], examples: Sequence[Any], size: int
) -> dict[str, Any]:
    """A batch of exactly `size` examples, repeating them when there are fewer (for timing)."""
    return collate([examples[i % len(examples)] for i in range(size)])
