"""The run's summary and per-epoch curves, written beside the model when training ends."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mmops.training.progress import TrainResult

HISTORY_FILE = "history.json"
# The learning curves as a table, for `dvc plots`; timings are left to history.json.
HISTORY_CSV_FILE = "history.csv"
CURVE_COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")


def write_history(out: Path, result: TrainResult) -> None:
    """history.json (the whole result) and history.csv (one row per epoch) in `out`."""
    (out / HISTORY_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    with (out / HISTORY_CSV_FILE).open("w", newline="") as file:
        writer = csv.DictWriter(file, CURVE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result.history)
