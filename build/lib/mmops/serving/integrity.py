"""Model files checked against the SHA-256 digests recorded with them, before any is opened.

A folder's `digests.json` (written when the model was saved or exported) says what each file
must hash to; a registered version also carries them in a tag, and a download's manifest is
rewritten from that tag, so an altered manifest is caught too. A damaged or missing file is a
`DamagedModelError` naming the model, the file and the next step, never a parser's traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mmops.model.digests import DIGESTS_FILE, sha256_file, write_manifest

log = logging.getLogger(__name__)

DIGESTS_TAG = "mmops.digests"  # a registered version's digests, as compact JSON
REGISTRY_SCHEME = "models:/"
ROLLBACK_HINT = (
    "`mmops rollback` moves the champion back to the version before it; `mmops models` lists "
    "the versions"
)
FOLDER_HINT = (
    "export the model again (`mmops export`); a registered champion goes back with `mmops rollback`"
)


class DamagedModelError(RuntimeError):
    """A model file missing or not as recorded: one line naming the model, the file and the fix."""

    def __init__(self, source: str, file: str, problem: str) -> None:
        self.source, self.file, self.problem = source, file, problem
        self.message = f"{source}: {file}: {problem}"
        self.hint = ROLLBACK_HINT if source.startswith(REGISTRY_SCHEME) else FOLDER_HINT
        super().__init__(f"{self.message}; hint: {self.hint}")


@dataclass(frozen=True)
class Manifest:
    """What a model folder's files must hash to, and what errors call the model."""

    source: str  # models:/<name>/<version>, runs:/... or the folder
    files: dict[str, str] | None  # None: nothing recorded (a model saved before digests)

    def recorded(self, name: str) -> bool:
        return self.files is not None and name in self.files


def read_manifest(folder: Path) -> Manifest:
    """The folder's `digests.json`; a manifest of nothing when there is none."""
    path = folder / DIGESTS_FILE
    if not path.is_file():
        return Manifest(str(folder), None)
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if files is not None and not all(isinstance(v, str) for v in files.values()):
            raise ValueError("a digest is not a string")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DamagedModelError(
            str(folder), DIGESTS_FILE, f"cannot be read ({error}); the manifest is damaged"
        ) from None
    return Manifest(data.get("source") or str(folder), files)


def parse_tag(source: str, value: str | None) -> dict[str, str] | None:
    """The digests a registered version's DIGESTS_TAG holds; None without one."""
    if not value:
        return None
    try:
        return {str(k): str(v) for k, v in json.loads(value).items()}
    except (ValueError, AttributeError) as error:
        raise DamagedModelError(
            source, f"tag {DIGESTS_TAG}", f"cannot be read ({error}); the tag was altered"
        ) from None


def adopt_recorded(folder: Path, source: str, recorded: dict[str, str] | None) -> Manifest:
    """Make a downloaded folder's manifest the registered one (`recorded`), named `source`.

    A manifest that disagrees with the registration was altered after it: refused. Without
    registered digests the folder's own manifest stands, under the new name.
    """
    own = read_manifest(folder)
    if recorded is not None and own.files is not None and own.files != recorded:
        raise DamagedModelError(
            source,
            DIGESTS_FILE,
            "does not match the digests recorded at registration; the manifest was altered",
        )
    files = recorded if recorded is not None else own.files
    write_manifest(folder, files, source)
    return Manifest(source, files)


def verify_model(folder: Path, manifest: Manifest, files: Iterable[str] | None = None) -> None:
    """Raise DamagedModelError for the first of `files` (default: every recorded file) that is
    missing or whose SHA-256 is not the recorded one; files not recorded are not checked."""
    if manifest.files is None:
        return
    names = manifest.files if files is None else [f for f in files if manifest.recorded(f)]
    for name in sorted(names):
        expected = manifest.files[name]
        path = folder / name
        if not path.is_file():
            raise DamagedModelError(manifest.source, name, "missing; the file was lost")
        found = sha256_file(path)
        if found != expected:
            raise DamagedModelError(
                manifest.source,
                name,
                f"sha256 mismatch (expected {expected[:12]}.., found {found[:12]}..); "
                "the file is damaged",
            )


def require_digests(manifest: Manifest, required: bool) -> None:
    """A model with no recorded digests: a warning (it loads unverified), or refused."""
    if manifest.files is not None:
        return
    if required:
        raise DamagedModelError(
            manifest.source,
            DIGESTS_FILE,
            "missing, and predict.require_digests refuses a model without recorded digests",
        )
    log.warning(
        "%s: no digests recorded (a model saved before mmops recorded them); loading it unverified",
        manifest.source,
    )
