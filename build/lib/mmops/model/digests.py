"""SHA-256 digests of a model folder's files, written beside them as `digests.json`.

The manifest travels with the files (into MLflow, out of a download), so whoever loads the folder
can tell a damaged or missing file from the one that was saved; `mmops.serving.integrity` checks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

DIGESTS_FILE = "digests.json"
# Written beside a model after its digests (the MLflow run it was logged to), never loaded as
# part of it: recording them would make every logged model differ from its manifest.
UNRECORDED = frozenset({DIGESTS_FILE, "mlflow_run.json"})
FORMAT = 1
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in chunks (weights files are hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(folder: Path | str) -> dict[str, str]:
    """Every file under `folder` (POSIX paths relative to it) and its SHA-256, but UNRECORDED."""
    root = Path(folder)
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() not in UNRECORDED
    }


def manifest(files: dict[str, str] | None, source: str | None = None) -> dict[str, Any]:
    """The manifest's content: `files` (None: nothing recorded) and what the model is called."""
    return {"format": FORMAT, "algorithm": "sha256", "source": source, "files": files}


def write_digests(folder: Path | str, source: str | None = None) -> dict[str, str]:
    """Record the digests of the folder's files in its `digests.json`; the digests."""
    files = file_digests(folder)
    write_manifest(folder, files, source)
    return files


def write_manifest(folder: Path | str, files: dict[str, str] | None, source: str | None) -> None:
    text = json.dumps(manifest(files, source), indent=2, sort_keys=True) + "\n"
    (Path(folder) / DIGESTS_FILE).write_text(text)
