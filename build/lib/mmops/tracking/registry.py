"""The model registry in MLflow: versions, the challenger-versus-champion gate, promotion, rollback.

Aliases carry the state (`champion`, `challenger`). MLflow keeps no history of alias moves, so
every move is also written to the version's tags and to a write-ahead log on the registered
model (`mmops.tracking.history`), which is what `rollback` walks. Gate-and-promote runs under
a lock, so two runs on one host finishing together cannot interleave their reads and alias moves.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from mmops.config import Params
from mmops.environment import mlflow_client, tracking_uri
from mmops.evaluation.records import BaselineResult, ClassificationMetrics, ZeroShotResult
from mmops.export.records import ExportReport
from mmops.model.digests import DIGESTS_FILE
from mmops.serving.integrity import DIGESTS_TAG, read_manifest
from mmops.tracking import history as champion_log
from mmops.tracking.gate import Verdict, gate, score
from mmops.tracking.lease import LeaseTimeout, promotion_lease

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = champion_log.HISTORY_TAG
SOURCE_TAG = "mmops.model_uri"  # what a version was registered from: a retry finds it
# Tag values cut below 5000 characters: MLflow's SQL stores hold registered-model tags in
# VARCHAR(5000), and version tags too on schemas older than its tag-limit migration.
TAG_VALUE_LIMIT = 4900


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (no such version, nothing to roll back to)."""


def champion_version(name: str) -> str | None:
    """The version the `champion` alias points at, or None before the first promotion.

    Only a missing model or alias means no champion; any other error (denied, server down)
    propagates, so a challenger is never gated as if it were the first model.
    """
    try:
        aliases = mlflow_client().get_registered_model(name).aliases
    except MlflowException as exc:
        if _missing(exc):
            return None
        raise
    version = aliases.get(CHAMPION)
    return None if version is None else str(version)


def register(model_uri: str, name: str, tags: dict[str, str]) -> str:
    """The version of `name` registered from `model_uri`, tagged, with the `challenger` alias.

    Idempotent: a retry after a failure finds the version the first attempt created.
    """
    import mlflow

    version = _registered_from(name, model_uri)
    if version is None:
        mlflow.set_tracking_uri(tracking_uri())
        tags = {**tags, SOURCE_TAG: model_uri, **digests_tag(model_uri)}
        version = str(mlflow.register_model(model_uri, name, tags=tags).version)
    c = mlflow_client()
    c.update_model_version(name, version, description=version_description(tags))
    c.set_registered_model_alias(name, CHALLENGER, version)
    return version


def digests_tag(model_uri: str) -> dict[str, str]:
    """The DIGESTS_TAG of a version: the digests in the manifest logged with the model's files,
    kept apart from them so a manifest altered later is caught. Empty for a model without one.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(model_uri)
    # The model folder is the pyfunc's artifact (artifacts/<folder>/), or the root itself.
    folders = ["", *(f.path for f in repo.list_artifacts("artifacts") if f.is_dir)]
    for folder in folders:
        names = {Path(f.path).name for f in repo.list_artifacts(folder or None)}
        if DIGESTS_FILE not in names:
            continue
        with tempfile.TemporaryDirectory(prefix="mmops-digests-") as download:
            path = f"{folder}/{DIGESTS_FILE}" if folder else DIGESTS_FILE
            files = read_manifest(Path(repo.download_artifacts(path, download)).parent).files
        if files is None:
            break
        value = json.dumps(files, sort_keys=True, separators=(",", ":"))
        if len(value) > TAG_VALUE_LIMIT:
            log.warning(
                "%s: %d files' digests exceed a tag; only its digests.json records them",
                model_uri,
                len(files),
            )
            return {}
        return {DIGESTS_TAG: value}
    log.warning("%s: no %s; the version is registered without digests", model_uri, DIGESTS_FILE)
    return {}


def version_description(tags: dict[str, str]) -> str:
    """What the registry UI shows for a version: its test figures, data, code and serving."""
    return (
        f"test accuracy {tags.get('test.accuracy', '?')}, "
        f"macro-F1 {tags.get('test.macro_f1', '?')}; "
        f"data md5 {tags.get('data.dvc_md5') or tags.get('data.md5', '?')}, "
        f"git {tags.get('git.commit', '?')}; serving {tags.get('export.serving', '?')}; "
        f"training run {tags.get('train.run_id', '?')}"
    )


def gate_and_promote(
    name: str,
    version: str,
    data_dir: Path | str,
    params: Params,
    reason: str,
    baseline: BaselineResult | None = None,
    zero_shot: ZeroShotResult | None = None,
) -> tuple[Verdict, bool]:
    """Gate `version` against the champion of the moment and the better of the classical
    baseline and (with a dual encoder in `model.pretrained`) zero-shot, and promote it if it
    passes.

    `baseline` and `zero_shot` are the evaluate stage's, on the same data and params; without
    a baseline both are measured here (deterministic, so the same figures).
    """
    if baseline is None:
        from mmops.evaluation.baseline import fit_baseline
        from mmops.evaluation.zero_shot import zero_shot_floor

        # Outside the lock: they depend on the data and params only, not on the registry.
        baseline = fit_baseline(data_dir, params)
        zero_shot = zero_shot_floor(data_dir, params)
    with _lock(name):
        current = champion_version(name)
        challenger = score(name, version, data_dir, params)
        champion = None
        if current is not None and current != version:
            champion = score(name, current, data_dir, params)
        verdict = gate(challenger, champion, params.gate, baseline, zero_shot)
        _record_verdict(name, version, verdict)
        if verdict.passed:
            _move_champion(name, version, reason, action="promote")
        return verdict, verdict.passed


def promote(name: str, version: str, reason: str) -> bool:
    """Make `version` the champion by hand (no gate), recording who, when and why.

    False, and nothing recorded, when `version` already is the champion.
    """
    with _lock(name):
        if not _exists(name, version):
            raise RegistryError(f"{name} has no version {version}")
        return _move_champion(name, version, reason, action="promote")


def rollback(name: str, reason: str) -> str:
    """Move `champion` down the stack of earlier champions; the version left is off the stack.

    A second rollback goes further back, never to the version the first one left; a version
    since deleted is skipped. RegistryError when there is nothing earlier.
    """
    with _lock(name):
        current = champion_version(name)
        if current is None:
            raise RegistryError(f"{name} has no champion to roll back")
        c = mlflow_client()
        champion_log.recover(c, name, current)
        earlier = champion_log.stack(champion_log.read(c, name), current)[:-1]
        target = next((v for v in reversed(earlier) if _exists(name, v)), None)
        if target is None:
            raise RegistryError(
                f"{name}: nothing earlier to roll back to (champion v{current} is the oldest "
                "in the history)"
            )
        _move_champion(name, target, reason, action="rollback")
        return target


def history(name: str) -> list[dict[str, Any]]:
    """Alias moves, oldest first: version, previous, action, at, by, reason, state."""
    return champion_log.read(mlflow_client(), name)


def list_versions(name: str) -> list[dict[str, Any]]:
    """Every version with its aliases and key tags, newest first."""
    c = mlflow_client()
    try:
        aliases = c.get_registered_model(name).aliases
    except MlflowException as exc:
        if not _missing(exc):
            raise  # a server away or refusing is not an empty registry
        return []
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    versions = c.search_model_versions(f"name = '{name}'")
    return [
        {
            "version": str(v.version),
            "aliases": sorted(by_version.get(str(v.version), [])),
            "run_id": v.run_id,
            "created": datetime.fromtimestamp(v.creation_timestamp / 1000, UTC).isoformat(),
            "tags": dict(v.tags),
        }
        for v in sorted(versions, key=lambda v: -int(v.version))
    ]


def champion_summary(name: str) -> dict[str, Any]:
    """The champion's version, data and code versions, test metrics, serving backend and speed."""
    c = mlflow_client()
    try:
        version = c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        raise RegistryError(f"{name} has no champion in {tracking_uri()}") from None
    tags = version.tags
    try:
        metrics = c.get_run(version.run_id).data.metrics
    except MlflowException:
        metrics = {}  # a deleted run: the version's own tags still tell the rest
    # The export stage times every backend on the same test examples, per batch size.
    speedup = {}
    for key, torch_ms in metrics.items():
        if key.startswith("export.latency.torch.bs") and key.endswith(".p50_ms"):
            size = key.removeprefix("export.latency.torch.bs").removesuffix(".p50_ms")
            int8_ms = metrics.get(f"export.latency.int8.bs{size}.p50_ms")
            if int8_ms:
                speedup[int(size)] = round(torch_ms / int8_ms, 2)
    return {
        "model": name,
        "version": str(version.version),
        "run_id": version.run_id,
        "data_md5": tags.get("data.dvc_md5") or tags.get("data.md5"),
        "git_commit": tags.get("git.commit"),
        "test_accuracy": _number(tags.get("test.accuracy")),
        "test_macro_f1": _number(tags.get("test.macro_f1")),
        "serving": tags.get("export.serving"),
        # p50 latency of torch / INT8 ONNX per batch size
        "int8_speedup": dict(sorted(speedup.items())),
    }


def _number(text: str | None) -> float | None:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _move_champion(name: str, version: str, reason: str, action: str) -> bool:
    """Log the move, move the alias, mark the move done; False when `version` is champion."""
    c = mlflow_client()
    previous = champion_version(name)
    champion_log.recover(c, name, previous)
    if previous == version:
        log.info("%s: v%s already is the champion; nothing moved", name, version)
        return False
    entry = champion_log.entry(version, previous, action, _who(), reason)
    champion_log.begin(c, name, entry)
    c.set_registered_model_alias(name, CHAMPION, version)
    champion_log.commit(c, name, entry)
    return True


def _missing(exc: MlflowException) -> bool:
    return exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def _exists(name: str, version: str) -> bool:
    try:
        mlflow_client().get_model_version(name, version)
    except MlflowException as exc:
        if _missing(exc):
            return False
        raise
    return True


def _registered_from(name: str, model_uri: str) -> str | None:
    """The version an earlier attempt registered from `model_uri`, if any."""
    try:
        versions = mlflow_client().search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        if _missing(exc):
            return None
        raise
    for v in sorted(versions, key=lambda v: int(v.version)):
        if v.tags.get(SOURCE_TAG) == model_uri or v.source == model_uri:
            return str(v.version)
    return None


def _record_verdict(name: str, version: str, verdict: Verdict) -> None:
    c = mlflow_client()
    c.set_model_version_tag(name, version, "mmops.gate.passed", str(verdict.passed))
    c.set_model_version_tag(name, version, "mmops.gate.reasons", reasons_tag(verdict.reasons))
    champion = verdict.champion.version if verdict.champion else "none"
    c.set_model_version_tag(name, version, "mmops.gate.champion", champion)
    c.set_model_version_tag(
        name, version, "mmops.gate.accuracy", f"{verdict.challenger.accuracy:.6f}"
    )
    if verdict.baseline is not None:
        base = verdict.baseline
        c.set_model_version_tag(
            name, version, "mmops.gate.baseline", f"{base.kind} {base.test_accuracy:.6f}"
        )


def _who() -> str:
    return os.environ.get("MMOPS_USER") or getpass.getuser()


@contextmanager
def _lock(name: str) -> Iterator[None]:
    """One gate-and-promote or alias move at a time per (store, model).

    A file lock serialises the processes of one host; the lease on the registered model
    (`mmops.tracking.lease`) serialises hosts, as far as MLflow without compare-and-set allows.
    """
    key = hashlib.sha256(f"{tracking_uri()}|{name}".encode()).hexdigest()[:16]
    folder = Path(os.environ.get("MMOPS_LOCK_DIR", tempfile.gettempdir()))
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"mmops-registry-{key}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            with ExitStack() as held:
                try:
                    held.enter_context(promotion_lease(mlflow_client(), name))
                except LeaseTimeout as exc:
                    raise RegistryError(str(exc)) from None
                yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def reasons_tag(reasons: list[str]) -> str:
    """Reasons as one tag value: joined by "; ", "none" when empty, cut to MLflow's limit."""
    return ("; ".join(reasons) or "none")[:TAG_VALUE_LIMIT]


TRIGGERS = ("manual", "schedule", "drift")


def check_trigger(trigger: str) -> None:
    """What started a retrain, as the registered version records it: manual, schedule or drift."""
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger: must be one of {', '.join(TRIGGERS)}, got {trigger!r}")


def registration_tags(
    data_version: dict[str, Any],
    quality: ClassificationMetrics,
    export: ExportReport,
    run_id: str,
    trigger: str = "manual",
    reason: str | None = None,
) -> dict[str, str]:
    """Tags of a new model version: data version, git commit, key metrics, export verdict, and
    what started the retrain (`trigger`: manual, schedule or drift, with the alarm as reason)."""
    check_trigger(trigger)
    return {
        "trigger": trigger,
        "trigger.reason": (reason or "none")[:TAG_VALUE_LIMIT],
        "data.md5": str(data_version["md5"]),
        "data.dvc_md5": str(data_version.get("dvc_md5")),
        "git.commit": str(data_version.get("git_commit")),
        "train.run_id": run_id,
        "test.accuracy": f"{quality.accuracy:.6f}",
        "test.macro_f1": f"{quality.macro_f1:.6f}",
        "export.serving": export.serving,
        "export.int8_passed": str(export.gates.int8.passed),
        "export.int8_reasons": reasons_tag(export.gates.int8.reasons),
    }
