"""Validation throughput on a large demo dataset, against a bare decode of the same images.

Prints one JSON line. The baseline is the least any image check must do: read the manifest and
fully decode every image once, in one process. `ratio_vs_bare_decode` < 1 means validation (all
tabular and image checks, in parallel) finishes faster than that serial floor.

    python bench/validate_throughput.py --n 100000 [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from mmops.config import Params
from mmops.data.dataset import read_manifest
from mmops.data.demo import make_demo_data
from mmops.data.validate import validate_dataset


def bare_decode(root: Path) -> float:
    start = time.perf_counter()
    for relpath in read_manifest(root)["image"]:
        with Image.open(root / relpath) as image:
            image.load()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--data", type=Path, help="reuse (or create) the dataset here")
    args = parser.parse_args()
    root = args.data or Path(tempfile.mkdtemp(prefix="mmops-bench-")) / "demo"
    generate_s = None
    if not (root / "manifest.jsonl").exists():
        start = time.perf_counter()
        make_demo_data(root, n=args.n)
        generate_s = time.perf_counter() - start
    bare_decode(root)  # warm the page cache so both timings read from memory
    baseline_s = bare_decode(root)
    start = time.perf_counter()
    report = validate_dataset(root, Params())
    validate_s = time.perf_counter() - start
    rows = report.stats["rows"]
    print(
        json.dumps(
            {
                "bench": "validate_throughput",
                "rows": rows,
                "cpus": os.cpu_count(),
                "success": report.success,
                "generate_s": round(generate_s, 2) if generate_s else None,
                "validate_s": round(validate_s, 2),
                "validate_rows_per_s": round(rows / validate_s),
                "baseline_bare_decode_s": round(baseline_s, 2),
                "ratio_vs_bare_decode": round(validate_s / baseline_s, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
