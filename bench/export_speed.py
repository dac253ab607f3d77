"""INT8 ONNX against FP32 torch: latency per batch size, file size and test accuracy, in one run.

Exports the trained model (default: the pipeline's `models/train/model` on `data/demo`, what
`dvc repro` leaves) to a temporary folder, then times the torch model, FP32 ONNX and INT8 ONNX on
the same test-split batches, in blocks whose order rotates so machine noise hits all three alike,
each with the same number of threads. Prints one JSON line of figures and ratios against torch:

    python bench/export_speed.py [--model models/train/model] [--data data/demo] [--repeats 50]
        [--set key=value ...]

The export's own latency table is skipped (one repeat at batch 1): this bench times instead.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmops.config import load_params
from mmops.data.dataset import load_splits
from mmops.export.exporter import export_model
from mmops.model.preprocess import Collator, MultimodalDataset
from mmops.model.storage import load_model
from mmops.serving.runners import OnnxRunner, cycled_batch
from mmops.serving.torch_runner import TorchRunner

BATCH_SIZES = (1, 8, 32)
ROUNDS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/train/model"))
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--set", action="append", default=[], help="params override, key=value")
    args = parser.parse_args()
    if not (args.model / "mmops_model.json").is_file():
        raise SystemExit(f"{args.model}: no trained model; run `bash infra/local/demo.sh` first")
    params = load_params(
        args.params if args.params.is_file() else None,
        [*args.set, "export.latency_batch_sizes=[1]", "export.latency_repeats=1"],
    )
    threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = export_model(args.model, args.data, params, Path(tmp) / "export")
        export_s = time.perf_counter() - start
        folder = Path(tmp) / "export"
        loaded = load_model(folder)
        runners = {
            "torch": TorchRunner(loaded),
            "fp32": OnnxRunner(folder / "model.onnx", "fp32", threads),
            "int8": OnnxRunner(folder / "model.int8.onnx", "int8", threads),
        }
        config = loaded.model.config
        collate = Collator(
            loaded.tokenizer, loaded.image_spec, config.max_text_length, config.text_padding
        )
        frame = load_splits(args.data, params)
        test = frame[frame["split"] == "test"]
        labels = {label: i for i, label in enumerate(loaded.labels)}
        dataset = MultimodalDataset(args.data, test, labels, loaded.image_spec)
        examples = [dataset[i] for i in range(len(dataset))]

        latency: dict[str, dict[str, float]] = {name: {} for name in runners}
        for bs in BATCH_SIZES:
            batch = cycled_batch(collate, examples, bs)
            times: dict[str, list[float]] = {name: [] for name in runners}
            # Blocks per runner, in a rotating order: interleaving single calls would let one
            # runtime's spinning worker threads steal the cores from the next one.
            names = list(runners)
            for round_ in range(ROUNDS):
                for name in names[round_ % 3 :] + names[: round_ % 3]:
                    for _ in range(3):  # warm-up after the other runtimes ran
                        runners[name](batch)
                    for _ in range(max(1, args.repeats // ROUNDS)):
                        t = time.perf_counter()
                        runners[name](batch)
                        times[name].append((time.perf_counter() - t) * 1000)
            for name in runners:
                latency[name][str(bs)] = float(np.median(times[name]))

    figures = {
        "threads": threads,
        "test_examples": len(examples),
        "export_s": round(export_s, 1),
        "latency_ms_p50": {n: {b: round(v, 3) for b, v in d.items()} for n, d in latency.items()},
        "speedup_int8_vs_torch": {
            str(bs): round(latency["torch"][str(bs)] / latency["int8"][str(bs)], 2)
            for bs in BATCH_SIZES
        },
        "speedup_fp32_onnx_vs_torch": {
            str(bs): round(latency["torch"][str(bs)] / latency["fp32"][str(bs)], 2)
            for bs in BATCH_SIZES
        },
        "size_bytes": report.size_bytes,
        "size_ratio_int8_vs_fp32": round(report.size_ratio_int8_vs_fp32, 3),
        "size_ratio_int8_vs_torch": round(
            report.size_bytes["int8"] / report.size_bytes["torch"], 3
        ),
        "accuracy": {k: round(v, 4) for k, v in report.accuracy.items()},
        "accuracy_drop_points_int8": round(
            100 * (report.accuracy["torch"] - report.accuracy["int8"]), 2
        ),
        "int8_agreement": round(report.gates.int8.agreement, 4),
        "int8_gate_passed": report.gates.int8.passed,
        "serving": report.serving,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
