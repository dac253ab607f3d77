"""Batch prediction to a file: records in (JSONL or dataset rows), one JSON line out per record."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmops.serving.predictor import Predictor


def predict_to_file(
    predictor: Predictor,
    records: Iterable[Any],
    out: Path | str,
    root: Path | str | None = None,
) -> dict[str, Any]:
    """Predict records in batches and write one JSON line per record; returns a summary."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = predictor.config.batch_size
    counts: dict[str, int] = {}
    total = errors = 0
    with out.open("w", encoding="utf-8") as f:
        for chunk in _chunks(records, size):
            for result in predictor.predict_batch(chunk, root):
                total += 1
                if "error" in result:
                    errors += 1
                else:
                    counts[result["label"]] = counts.get(result["label"], 0) + 1
                f.write(json.dumps(result, default=str) + "\n")
    return {
        "records": total,
        "errors": errors,
        "labels": counts,
        "backend": predictor.backend,
        "model": predictor.identity.name,
        "version": predictor.identity.version,
        "out": str(out),
    }


def read_records(path: Path | str) -> Iterable[Any]:
    """Records from a JSONL file, lazily; a line that is not JSON becomes an error record."""
    with Path(path).open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                yield {"id": f"{Path(path).name}:{lineno}", "_invalid": error.msg}
            except (ValueError, RecursionError) as error:  # a 5000-digit number, deep nesting
                yield {"id": f"{Path(path).name}:{lineno}", "_invalid": str(error)[:200]}


def _chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
