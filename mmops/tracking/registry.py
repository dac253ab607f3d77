"""The model registry in MLflow: versions, the challenger-versus-champion gate, promotion, rollback.

Aliases carry the state (`champion`, `challenger`). MLflow keeps no history of alias moves, so
every move is also written to the version's tags and to an append-only log on the registered
model (tag `mmops.champion_history`), which is what `rollback` reads. Gate-and-promote runs under
a lock, so two runs finishing together cannot interleave their reads and alias moves.
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
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from mmops.config import Params
from mmops.environment import mlflow_client, tracking_uri
from mmops.evaluation.records import BaselineResult, ClassificationMetrics
from mmops.export.records import ExportReport
from mmops.tracking.gate import Verdict, gate, score

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "mmops.champion_history"
_HISTORY_KEEP = 30  # entries in the registered-model tag; version tags keep the rest
# Tag values cut below 5000 characters: MLflow's SQL stores hold registered-model tags in
# VARCHAR(5000), and version tags too on schemas older than its tag-limit migration.
TAG_VALUE_LIMIT = 4900


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (no such version, nothing to roll back to)."""


def champion_version(name: str) -> str | None:
    """The version the `champion` alias points at, or None before the first promotion."""
    try:
        return str(mlflow_client().get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def register(model_uri: str, name: str, tags: dict[str, str]) -> str:
    """A new version of `name` from a logged model, tagged, with the `challenger` alias."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    version = str(mlflow.register_model(model_uri, name, tags=tags).version)
    c = mlflow_client()
    c.update_model_version(name, version, description=version_description(tags))
    c.set_registered_model_alias(name, CHALLENGER, version)
    return version


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
) -> tuple[Verdict, bool]:
    """Gate `version` against the champion of the moment and the classical baseline, and
    promote it if it passes.

    `baseline` is the one the evaluate stage fitted on the same data and params; without it the
    baseline is fitted here (deterministic, so the same figures).
    """
    if baseline is None:
        from mmops.evaluation.baseline import fit_baseline

        # Outside the lock: it depends on the data and params only, not on the registry.
        baseline = fit_baseline(data_dir, params)
    with _lock(name):
        current = champion_version(name)
        challenger = score(name, version, data_dir, params)
        champion = None
        if current is not None and current != version:
            champion = score(name, current, data_dir, params)
        verdict = gate(challenger, champion, params.gate, baseline)
        _record_verdict(name, version, verdict)
        if verdict.passed:
            _move_champion(name, version, reason, action="promote")
        return verdict, verdict.passed


def promote(name: str, version: str, reason: str) -> None:
    """Make `version` the champion by hand (no gate), recording who, when and why."""
    with _lock(name):
        try:
            mlflow_client().get_model_version(name, version)
        except MlflowException:
            raise RegistryError(f"{name} has no version {version}") from None
        _move_champion(name, version, reason, action="promote")


def rollback(name: str, reason: str) -> str:
    """Move `champion` back to the version that held it before the current one."""
    with _lock(name):
        current = champion_version(name)
        if current is None:
            raise RegistryError(f"{name} has no champion to roll back")
        previous = None
        for entry in reversed(history(name)):
            if entry["version"] == current and entry.get("previous"):
                previous = entry["previous"]
                break
        if previous is None:
            raise RegistryError(f"{name}: champion v{current} has no earlier champion")
        _move_champion(name, previous, reason, action="rollback")
        return previous


def history(name: str) -> list[dict[str, Any]]:
    """Alias moves, oldest first: version, previous, action, at, by, reason."""
    tags = mlflow_client().get_registered_model(name).tags
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def list_versions(name: str) -> list[dict[str, Any]]:
    """Every version with its aliases and key tags, newest first."""
    c = mlflow_client()
    try:
        aliases = c.get_registered_model(name).aliases
    except MlflowException:
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


def _move_champion(name: str, version: str, reason: str, action: str) -> None:
    c = mlflow_client()
    previous = champion_version(name)
    c.set_registered_model_alias(name, CHAMPION, version)
    entry = {
        "version": version,
        "previous": previous,
        "action": action,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "by": _who(),
        "reason": reason,
    }
    for key in ("at", "by", "reason", "action"):
        c.set_model_version_tag(name, version, f"mmops.champion.{key}", str(entry[key]))
    c.set_model_version_tag(name, version, "mmops.champion.previous", str(previous))
    entries = [*history(name)[-(_HISTORY_KEEP - 1) :], entry]
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(entries))
    log.info("%s: champion v%s -> v%s (%s: %s)", name, previous, version, action, reason)


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
    """A host-wide lock per (store, model): one gate-and-promote or alias move at a time.

    Runs on several hosts against one tracking server also take the Prefect concurrency limit
    `mmops-registry` in the flow (see flows/retrain.py); MLflow itself has no compare-and-set.
    """
    key = hashlib.sha256(f"{tracking_uri()}|{name}".encode()).hexdigest()[:16]
    folder = Path(os.environ.get("MMOPS_LOCK_DIR", tempfile.gettempdir()))
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"mmops-registry-{key}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def reasons_tag(reasons: list[str]) -> str:
    """Reasons as one tag value: joined by "; ", "none" when empty, cut to MLflow's limit."""
    return ("; ".join(reasons) or "none")[:TAG_VALUE_LIMIT]


def registration_tags(
    data_version: dict[str, Any],
    quality: ClassificationMetrics,
    export: ExportReport,
    run_id: str,
) -> dict[str, str]:
    """Tags of a new model version: data version, git commit, key metrics, export verdict."""
    return {
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
