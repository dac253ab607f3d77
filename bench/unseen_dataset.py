"""Default params on dataset families no default was tuned on, against the classical baseline
and a hyperparameter search.

Each family of `mmops.data.synthetic` (compositional, where neither modality alone beats chance;
text-dominant; image-dominant; 60 classes; 300 rows; 10:1 imbalance; natural textures; real
digit scans) is written to a temp folder and validated, then: the default params train and are
evaluated on the test split (accuracy, and image-only / text-only ablations); the baseline
(`mmops.evaluation.baseline.fit_baseline`) is fitted on the same splits; and a search
(`mmops.tracking.tune.tune`, `--trials` trials) picks params that are retrained and evaluated
the same way. MLflow records into a temp SQLite store, never the project's. Prints one JSON line:

    python bench/unseen_dataset.py [--families compositional,digits] [--n 1000 | --scale 0.5]
        [--trials 10] [--skip-search] [--seed 0] [--set train.epochs=20 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmops.config import Params, load_params
from mmops.data.dataset import read_manifest
from mmops.data.synthetic import FAMILIES, write_family
from mmops.data.validate import validate_dataset
from mmops.data.validation_report import REPORT_FILE, write_report
from mmops.evaluation.evaluate import evaluate_model
from mmops.training.train import train

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--n", type=int, default=None, help="rows of every family")
    size.add_argument("--scale", type=float, default=1.0, help="times each family's default rows")
    parser.add_argument("--trials", type=int, default=10, help="search trials per family")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="the datasets' seed")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    return args


def optional(module: str, name: str) -> Callable[..., Any] | None:
    """A function that may not exist yet in this checkout: None (and a note) when it does not."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        print(f"note: {module}.{name} unavailable ({exc}); recorded as null", file=sys.stderr)
        return None


def guarded(what: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one part of a family's bench; a failure is recorded, not fatal to the others."""
    try:
        return run()
    except Exception as exc:  # a benchmark of many datasets reports what broke and goes on
        traceback.print_exc(file=sys.stderr)
        return {"error": f"{what}: {type(exc).__name__}: {exc}"}


def train_and_evaluate(root: Path, params: Params, out: Path) -> dict[str, Any]:
    """Train with `params`, evaluate on the test split: accuracy, ablations, epochs, seconds."""
    start = time.perf_counter()
    result = train(root, params, out_dir=out / "train", resume=False, progress=False)
    seconds = time.perf_counter() - start
    report = evaluate_model(result.model_dir, root, params, out / "evaluate")
    # The evaluation fitted the classical baseline on the same splits: read it, don't refit.
    baseline = report.baseline
    return {
        "test_accuracy": round(report.classification.accuracy, 4),
        "image_only": round(report.ablation.image_only, 4),
        "text_only": round(report.ablation.text_only, 4),
        "epochs": result.epochs_run,
        "seconds": round(seconds, 1),
        "baseline": baseline
        and {
            "kind": baseline.kind,
            "test_accuracy": round(baseline.test_accuracy, 4),
            "val_accuracy": round(baseline.val_accuracy, 4),
        },
    }


def run_search(
    root: Path, params: Params, overrides: list[str], trials: int, out: Path
) -> dict[str, Any] | None:
    """Search, then retrain with the best values and evaluate like the default params."""
    tune = optional("mmops.tracking.tune", "tune")
    if tune is None:
        return None
    start = time.perf_counter()
    found = tune(root, params, trials=trials, timeout_s=None, out_dir=out / "search")
    search_s = time.perf_counter() - start
    best = [f"{key}={json.dumps(value)}" for key, value in found.best_overrides.items()]
    retrained = train_and_evaluate(root, load_params(PARAMS_FILE, [*overrides, *best]), out)
    return {
        "best_overrides": found.best_overrides,
        "best_val_accuracy": round(found.best_value, 4),
        "trials": found.n_trials,
        "pruned": found.n_pruned,
        "search_seconds": round(search_s, 1),
        **{key: value for key, value in retrained.items() if key != "baseline"},
    }


def minus(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """a's test accuracy minus b's, or None when either is missing."""
    if not a or not b or "test_accuracy" not in a or "test_accuracy" not in b:
        return None
    return round(a["test_accuracy"] - b["test_accuracy"], 4)


def bench_family(name: str, n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    root = work / name / "data"
    start = time.perf_counter()
    write_family(name, root, n=n, seed=args.seed)
    generate_s = time.perf_counter() - start
    params = load_params(PARAMS_FILE, args.overrides)
    frame = read_manifest(root)
    report = validate_dataset(root, params)
    # Training takes only data whose report passed this version: point training at it.
    write_report(report, work / name / "validate")
    overrides = [
        *args.overrides,
        f"train.validation_report={work / name / 'validate' / REPORT_FILE}",
    ]
    params = load_params(PARAMS_FILE, overrides)
    entry: dict[str, Any] = {
        "rows": len(frame),
        "classes": int(frame["label"].nunique()),
        "generate_seconds": round(generate_s, 2),
        "valid": report.success,
    }
    if not report.success:
        entry["failed_checks"] = [f"{c.name}: {c.detail}" for c in report.failed]
        return entry
    entry["default"] = guarded("default", lambda: train_and_evaluate(root, params, work / name))
    entry["baseline"] = entry["default"].pop("baseline", None)
    entry["search"] = (
        None
        if args.skip_search
        else guarded(
            "search",
            lambda: run_search(root, params, overrides, args.trials, work / name / "best"),
        )
    )
    entry["default_minus_baseline"] = minus(entry["default"], entry["baseline"])
    entry["search_minus_baseline"] = minus(entry["search"], entry["baseline"])
    return entry


def summarise(datasets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Counts over the families: where the default and the search reach the baseline."""

    def gaps(key: str) -> dict[str, float]:
        return {n: d[key] for n, d in datasets.items() if d.get(key) is not None}

    default, search = gaps("default_minus_baseline"), gaps("search_minus_baseline")
    return {
        "datasets": len(datasets),
        "compared": len(default),
        "default_ge_baseline": sum(g >= 0 for g in default.values()),
        "search_ge_baseline": sum(g >= 0 for g in search.values()),
        "search_gt_default": sum(search[n] > default[n] for n in search if n in default),
        "mean_default_minus_baseline": (
            round(sum(default.values()) / len(default), 4) if default else None
        ),
        "mean_search_minus_baseline": (
            round(sum(search.values()) / len(search), 4) if search else None
        ),
        "worst_default": min(default, key=default.__getitem__) if default else None,
    }


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmops-unseen-"))
    # Every run this bench makes (trials included) goes to a throwaway store.
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    datasets = {}
    for name in args.families:
        n = args.n or max(1, round(FAMILIES[name].n * args.scale))
        print(f"{name}: {n} rows in {work / name}", file=sys.stderr, flush=True)
        datasets[name] = bench_family(name, n, args, work)
    print(
        json.dumps(
            {
                "bench": "unseen_dataset",
                "seed": args.seed,
                "trials": 0 if args.skip_search else args.trials,
                "overrides": args.overrides,
                "datasets": datasets,
                "summary": summarise(datasets),
            }
        )
    )


if __name__ == "__main__":
    main()
