"""Data versions: the DVC content hash of a dataset plus the git commit, to trace models to data."""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class DataVersion:
    path: str
    # DVC's md5 of the directory listing ("<md5>.dir"), the value dvc.lock and .dvc files record.
    md5: str
    nfiles: int
    size: int
    # What dvc.lock (or a .dvc file) records for this path; None when DVC does not track it.
    dvc_md5: str | None
    git_commit: str | None
    git_dirty: bool | None

    @property
    def tracked(self) -> bool:
        """True when the data on disk is exactly what DVC recorded."""
        return self.dvc_md5 == self.md5

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tracked": self.tracked}


def data_version(path: Path | str) -> DataVersion:
    """Hash the dataset at `path` the way DVC does and read what DVC and git record for it."""
    path = Path(path).resolve()
    meta, obj = _build(path)
    return DataVersion(
        path=str(path),
        md5=obj.hash_info.value,
        nfiles=meta.nfiles if meta.isdir else 1,
        size=meta.size or 0,
        dvc_md5=recorded_md5(path),
        # Outside a git checkout (a container image), the commit the image was built from.
        git_commit=_git(path.parent, "rev-parse", "HEAD") or os.environ.get("MMOPS_GIT_COMMIT"),
        git_dirty=_git_dirty(path.parent),
    )


def content_md5(path: Path | str) -> str:
    """The DVC md5 of the dataset at `path`: the data version validation and training compare."""
    return _build(Path(path).resolve())[1].hash_info.value


def _build(path: Path) -> tuple[Any, Any]:
    """DVC's metadata and hash object of `path`."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem
    from dvc_objects.fs.memory import MemoryFileSystem

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such dataset")
    # A throwaway in-memory object store: we want the hash, not a cache entry.
    _, meta, obj = build(HashFileDB(MemoryFileSystem(), "/"), str(path), LocalFileSystem(), "md5")
    return meta, obj


def recorded_md5(path: Path) -> str | None:
    """The md5 that the nearest dvc.lock, or the `<path>.dvc` file, records for `path`."""
    dvc_file = path.with_name(path.name + ".dvc")
    if dvc_file.is_file():
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", [])
        return next(
            (o.get("md5") for o in outs if (dvc_file.parent / o["path"]).resolve() == path), None
        )
    for folder in path.parents:
        lock = folder / "dvc.lock"
        if lock.is_file():
            stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
            for stage in stages.values():
                for out in stage.get("outs", []):
                    if (folder / out["path"]).resolve() == path:
                        return out.get("md5")
            return None
        if (folder / ".dvc").is_dir():
            return None
    return None


def _git(cwd: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def _git_dirty(cwd: Path) -> bool | None:
    status = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)
