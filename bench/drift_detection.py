"""Drift detection on live streams that change part-way, per modality, on several datasets.

For each dataset (the demo and synthetic families it was not tuned on) a model is trained and
exported with the default params (fewer steps), which stores its reference embeddings. Fresh
events of the same generator with another seed are the live source; their embeddings through the
serving backend are computed once clean, with decoloured and with inverted images and with text
of another vocabulary (`mmops.monitoring.shifts`). Streams drawn from them go through the real
`DriftMonitor` in micro-batches, as `mmops serve` feeds it:

- `none`: `--null-events` unshifted events: every alarm is false.
- `image` / `invert` / `text`: every event after `--shift-at` has its image decoloured / its
  image inverted / its text in another vocabulary.
- `mixture`: one event in ten after the shift has text of another vocabulary.
- `label`: after the shift the most common class is 70% of events (every embedding moves).

Per scenario: `false_alarms` (alarms before the shift, summed over repeats), `median_delay`
(events from the shift to the first alarm of the signal that moved; for `label`, of `prediction`),
`detected` (repeats with that alarm within `--after` events) and `alarmed` (how often each signal
alarmed after the shift), and `wrong_modality_alarms` (alarms after the shift of an input
modality that did not move; `fused` and `prediction` follow any that did). Prints one JSON line:

    python bench/drift_detection.py [--datasets demo,textures,text_dominant] [--repeats 5]
        [--null-events 10000] [--shift-at 1000] [--after 2000] [--set drift.window=200 ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mmops.config import Params, load_params
from mmops.data.dataset import read_manifest
from mmops.data.demo import make_demo_data
from mmops.data.synthetic import FAMILIES, write_family
from mmops.data.validate import validate_dataset
from mmops.data.validation_report import REPORT_FILE, write_report
from mmops.export.exporter import export_model
from mmops.monitoring.monitor import DriftMonitor, Observed
from mmops.monitoring.shifts import LABEL_SHARE, MIXTURE_SHARE, shift_event
from mmops.serving.embeddings import DERIVED, PREDICTION
from mmops.serving.predictor import EMBEDS_KEY, Predictor
from mmops.stream.replay import dataset_events

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"
BATCH = 64
SCENARIOS = ("image", "invert", "text", "mixture", "label")
# The signal whose alarm is the detection: the modality that moved, or the class mix.
MOVED = {"image": "image", "invert": "image", "text": "text", "mixture": "text"}
MOVED["label"] = PREDICTION
FAST_TRAIN = ("train.min_steps=600", "train.epochs=10")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", default="demo,textures,text_dominant")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--null-events", type=int, default=10_000)
    parser.add_argument("--shift-at", type=int, default=1000)
    parser.add_argument("--after", type=int, default=2000)
    parser.add_argument("--source-events", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    return parser.parse_args()


def write_dataset(name: str, root: Path, seed: int, n: int | None = None) -> None:
    if name == "demo":
        make_demo_data(root, n=n or 2000, seed=seed)
    else:
        write_family(name, root, n=n, seed=seed)


def trained_model(name: str, work: Path, args: argparse.Namespace) -> tuple[Path, Params]:
    """Train and export a model on dataset `name`; the export folder holds its references."""
    from mmops.training.train import train

    root = work / name / "data"
    write_dataset(name, root, args.seed)
    params = load_params(PARAMS_FILE, [*FAST_TRAIN, *args.overrides])
    report = validate_dataset(root, params)
    write_report(report, work / name / "validate")
    if not report.success:
        raise RuntimeError(f"{name}: the dataset failed validation")
    report_file = work / name / "validate" / REPORT_FILE
    overrides = [*FAST_TRAIN, *args.overrides, f"train.validation_report={report_file}"]
    params = load_params(PARAMS_FILE, overrides)
    result = train(root, params, out_dir=work / name / "train", resume=False, progress=False)
    export_model(result.model_dir, root, params, work / name / "export")
    return work / name / "export", params


def source_signals(
    predictor: Predictor, events: list[dict[str, Any]]
) -> dict[str, dict[str, np.ndarray]]:
    """Each source event's signals, clean and with its image or its text shifted."""
    out = {}
    for kind in ("clean", "image", "invert", "text"):
        batch = events if kind == "clean" else [shift_event(e, kind) for e in events]
        results = []
        for i in range(0, len(batch), BATCH):
            results += predictor.predict_batch(batch[i : i + BATCH], embeddings=True)
        if any("error" in r for r in results):
            raise RuntimeError(f"{kind}: {next(r['error'] for r in results if 'error' in r)}")
        signals = {m: np.stack([r[EMBEDS_KEY][m] for r in results]) for m in results[0][EMBEDS_KEY]}
        signals[PREDICTION] = np.array(
            [[r["scores"][x] for x in predictor.labels] for r in results]
        )
        out[kind] = signals
    return out


def stream(
    kind: str, truth: np.ndarray, shift_at: int, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and which version of each (clean, image, text) a stream draws."""
    index = rng.integers(0, len(truth), n)
    version = np.array(["clean"] * n, dtype=object)
    later = n - shift_at
    if kind in ("image", "invert", "text"):
        version[shift_at:] = kind
    elif kind == "mixture":
        version[shift_at:] = np.where(rng.random(later) < MIXTURE_SHARE, "text", "clean")
    elif kind == "label":
        values, counts = np.unique(truth, return_counts=True)
        favoured = truth == values[counts.argmax()]
        weights = np.where(favoured, LABEL_SHARE / favoured.sum(), 0.0)
        weights[~favoured] = (1 - LABEL_SHARE) / (~favoured).sum()
        index[shift_at:] = rng.choice(len(truth), later, p=weights)
    return index, version


def run_stream(
    monitor: DriftMonitor,
    signals: dict[str, dict[str, np.ndarray]],
    index: np.ndarray,
    version: np.ndarray,
) -> list[tuple[str, int]]:
    """(signal, event) of each alarm, with a fresh start of every detector."""
    for state in monitor.signals.values():
        state.detector.reset()
        state.positions.clear()
        state.alarm, state.quiet = False, 0
    alarms = []
    names = list(signals["clean"])
    for start in range(0, len(index), BATCH):
        rows = slice(start, start + BATCH)
        batch = {
            name: np.stack(
                [signals[v][name][i] for i, v in zip(index[rows], version[rows], strict=True)]
            )
            for name in names
        }
        size = len(index[rows])
        positions = [("events", 0, start + i) for i in range(size)]
        for alarm in monitor.observe(Observed(positions, batch, {}, [None] * size)):
            alarms.append((alarm.modality, alarm.window["last"]["offset"]))
    return alarms


def scenario(
    monitor: DriftMonitor,
    signals: dict[str, dict[str, np.ndarray]],
    truth: np.ndarray,
    kind: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    false_alarms, delays, alarmed, wrong = 0, [], Counter(), 0
    repeats = 1 if kind == "none" else args.repeats
    for r in range(repeats):
        rng = np.random.default_rng((args.seed, r, SCENARIOS.index(kind) if kind in MOVED else 9))
        shift_at = args.null_events if kind == "none" else args.shift_at
        n = args.null_events if kind == "none" else args.shift_at + args.after
        alarms = run_stream(monitor, signals, *stream(kind, truth, shift_at, n, rng))
        false_alarms += sum(at < shift_at for _, at in alarms)
        after = {(name, at) for name, at in alarms if at >= shift_at}
        alarmed.update({name for name, _ in after})
        # An input modality that did not move, alarming after the shift (a label shift moves
        # every input's mix, so it has none).
        per_event = kind not in ("none", "label")
        moved = (MOVED[kind],) if per_event else tuple(monitor.signals)
        wrong += sum(name not in (*moved, *DERIVED) for name, _ in after)
        hits = [at - shift_at for name, at in after if name == MOVED.get(kind)]
        if hits:
            delays.append(min(hits))
    entry: dict[str, Any] = {"false_alarms": false_alarms, "repeats": repeats}
    if kind != "none":
        entry.update(
            median_delay=statistics.median(delays) if len(delays) * 2 > repeats else None,
            delays=sorted(delays),
            detected=len(delays),
            moved=MOVED[kind],
            alarmed=dict(alarmed),
            wrong_modality_alarms=wrong,
        )
    return entry


def bench_dataset(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    folder, params = trained_model(name, work, args)
    predictor = Predictor(folder, config=params.predict)
    source = work / name / "live"
    write_dataset(name, source, args.seed + 1, args.source_events)
    rows = read_manifest(source).to_dict("records")
    events = dataset_events(rows, source)
    signals = source_signals(predictor, events)
    truth = np.array([str(e["truth"]) for e in events])
    assert predictor.references is not None
    start = time.perf_counter()
    monitor = DriftMonitor(predictor.references, params.drift, name, "bench")
    calibration_s = time.perf_counter() - start
    entry: dict[str, Any] = {
        "reference": predictor.references.size,
        "signals": list(monitor.signals),
        "calibration_s": round(calibration_s, 2),
    }
    start = time.perf_counter()
    entry["none"] = scenario(monitor, signals, truth, "none", args)
    per_event = (time.perf_counter() - start) / args.null_events
    entry["monitor_us_per_event"] = round(per_event * 1e6, 1)
    for kind in SCENARIOS:
        entry[kind] = scenario(monitor, signals, truth, kind, args)
    return entry


def main() -> None:
    args = parse_args()
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n != "demo" and n not in FAMILIES]
    if unknown:
        sys.exit(f"unknown datasets {unknown}; demo or one of {', '.join(FAMILIES)}")
    params = load_params(PARAMS_FILE, args.overrides)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mmops-drift-bench-") as work:
        for name in names:
            results[name] = bench_dataset(name, Path(work), args)
            print(f"{name}: {json.dumps(results[name])}", file=sys.stderr)
    scenarios = [s for d in results.values() for k, s in d.items() if k in SCENARIOS]
    delays = [s["median_delay"] for s in scenarios]
    print(
        json.dumps(
            {
                "bench": "drift_detection",
                "window": params.drift.window,
                "ert": params.drift.ert,
                "datasets": results,
                "false_alarms": sum(
                    d[k]["false_alarms"] for d in results.values() for k in ("none", *SCENARIOS)
                ),
                "worst_median_delay": None if None in delays else max(delays, default=None),
                "undetected_scenarios": sum(d is None for d in delays),
                "wrong_modality_alarms": sum(s["wrong_modality_alarms"] for s in scenarios),
            }
        )
    )


if __name__ == "__main__":
    main()
