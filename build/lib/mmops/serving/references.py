"""Model references: a folder, `runs:/<id>/<path>`, `models:/<name>/<version>` or
`models:/<name>@<alias>`, parsed in one place and resolved to a local folder through MLflow."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mmops.environment import mlflow_client, tracking_uri
from mmops.model.folder import META_FILE
from mmops.serving.integrity import (
    DIGESTS_TAG,
    REGISTRY_SCHEME,
    DamagedModelError,
    adopt_recorded,
    parse_tag,
    read_manifest,
    require_digests,
    verify_model,
)

RUN_FILE = "mlflow_run.json"


@dataclass(frozen=True)
class ModelIdentity:
    """What a prediction names as its source: a registered model and version, or a folder."""

    name: str
    version: str
    run_id: str | None = None


@dataclass(frozen=True)
class RegistryRef:
    """A `models:/` reference: a registered model and either a version or an alias."""

    name: str
    version: str | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, ref: str) -> RegistryRef | None:
        """The parts of a `models:/` reference; None for any other kind of reference."""
        if not ref.startswith(REGISTRY_SCHEME):
            return None
        rest = ref.removeprefix(REGISTRY_SCHEME)
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return cls(name, alias=alias)
        name, _, version = rest.partition("/")
        return cls(name, version=version or None)

    def at_version(self, version: str) -> str:
        """The reference pinned to `version` of the same registered model."""
        return f"{REGISTRY_SCHEME}{self.name}/{version}"


def alias_version(name: str, alias: str) -> str:
    """The version an alias of a registered model points at now."""
    return str(mlflow_client().get_model_version_by_alias(name, alias).version)


def model_identity(model_ref: str, run_id: str | None) -> ModelIdentity:
    """The registered name and version a `models:/` reference points at (else the run)."""
    ref = RegistryRef.parse(model_ref)
    if ref is None:
        return ModelIdentity(model_ref, run_id or "unknown", run_id)
    if ref.alias is not None:
        return ModelIdentity(ref.name, alias_version(ref.name, ref.alias), run_id)
    return ModelIdentity(ref.name, str(ref.version), run_id)


def local_run_id(folder: Path) -> str | None:
    """The MLflow run a model folder was logged to, from the file training writes beside it."""
    return _run_file(folder).get("run_id")


def logged_model_id(model_ref: str) -> str | None:
    """The MLflow logged model (MLflow 3 `model_id`) a reference points at, if it has one."""
    import mlflow

    local = Path(model_ref)
    if (local / META_FILE).is_file():
        return _run_file(local).get("model_id")
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.models.get_model_info(model_ref).model_id


def _run_file(folder: Path) -> dict:
    run_file = folder / RUN_FILE
    return json.loads(run_file.read_text()) if run_file.is_file() else {}


def resolve_model(model_ref: str, download_to: Path | None = None) -> tuple[Path, str | None]:
    """A local model folder and its MLflow run id, from a folder, runs:/ or models:/ URI (a
    download goes under `download_to`, else a new temporary folder), every file of it checked
    against its recorded digests (DamagedModelError)."""
    folder, run_id = download_model(model_ref, download_to)
    manifest = read_manifest(folder)
    require_digests(manifest, required=False)  # a warning; the loader's params may refuse it
    verify_model(folder, manifest)
    return folder, run_id


def download_model(model_ref: str, download_to: Path | None = None) -> tuple[Path, str | None]:
    """`resolve_model` without checking the files: a download's manifest holds the digests
    recorded at registration and names the version (an alias pinned to it), for the loader."""
    import mlflow

    local = Path(model_ref)
    if (local / META_FILE).is_file():
        return local, local_run_id(local)
    mlflow.set_tracking_uri(tracking_uri())
    ref = RegistryRef.parse(model_ref)
    recorded = None
    if ref is not None and (ref.alias or ref.version):  # not a logged model, models:/<model_id>
        version = (
            mlflow_client().get_model_version_by_alias(ref.name, ref.alias)
            if ref.alias is not None
            else mlflow_client().get_model_version(ref.name, str(ref.version))
        )
        # Pinned: the alias may move while the files come down.
        model_ref = ref.at_version(str(version.version))
        recorded = parse_tag(model_ref, version.tags.get(DIGESTS_TAG))
    run_id = mlflow.models.get_model_info(model_ref).run_id
    # Always a copy: without a destination, a local store hands back its own files, and the
    # manifest of the download is rewritten below.
    target = download_to or Path(tempfile.mkdtemp(prefix="mmops-model-"))
    downloaded = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=model_ref, dst_path=str(target))
    )
    folder = next((p.parent for p in downloaded.rglob(META_FILE)), None)
    if folder is None:
        raise DamagedModelError(model_ref, META_FILE, "missing; the model folder was lost")
    adopt_recorded(folder, model_ref, recorded)
    return folder, run_id
