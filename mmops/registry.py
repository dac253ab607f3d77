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
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mmops.config import GateConfig, Params
from mmops.tracking import tracking_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "mmops.champion_history"
_HISTORY_KEEP = 30  # entries in the registered-model tag; version tags keep the rest


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (no such version, nothing to roll back to)."""


def client() -> MlflowClient:
    return MlflowClient(tracking_uri())


def champion_version(name: str) -> str | None:
    """The version the `champion` alias points at, or None before the first promotion."""
    try:
        return str(client().get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def register(model_uri: str, name: str, tags: dict[str, str]) -> str:
    """A new version of `name` from a logged model, tagged, with the `challenger` alias."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    version = str(mlflow.register_model(model_uri, name, tags=tags).version)
    client().set_registered_model_alias(name, CHALLENGER, version)
    return version


@dataclass(frozen=True)
class Score:
    """A model measured on the current test split through the serving path."""

    version: str
    accuracy: float
    groups: dict[str, float]
    group_gap: float
    latency_ms: float
    backend: str
    correct: list[bool] = field(repr=False)


def score(name: str, version: str, data_dir: Path | str, params: Params) -> Score:
    """Accuracy, per-group accuracy and latency of a registered version on the test split."""
    from mmops.predict import Predictor, cycled_batch, measure_latency
    from mmops.train import load_splits

    predictor = Predictor.load(f"models:/{name}/{version}", params.predict.backend, params.predict)
    frame = load_splits(data_dir, params)
    test = frame[frame["split"] == "test"].reset_index(drop=True)
    if test.empty:
        raise ValueError(f"{data_dir}: the test split is empty; the gate needs it")
    results = predictor.predict_batch(test[["id", "image", "text"]].to_dict("records"), data_dir)
    labels = test["label"]
    correct = np.array([r.get("label") == y for r, y in zip(results, labels, strict=True)])
    groups: dict[str, float] = {}
    if "group" in test:
        for group, rows in test.groupby(test["group"].fillna("none")):
            groups[str(group)] = float(correct[rows.index].mean())
    examples = [predictor.example(r, data_dir) for r in test.head(32).to_dict("records")]
    batch = cycled_batch(predictor.collate, examples, 32)
    latency = measure_latency(predictor.runner, batch, repeats=10)["p50_ms"]
    return Score(
        version=version,
        accuracy=float(correct.mean()),
        groups=groups,
        group_gap=max(groups.values()) - min(groups.values()) if groups else 0.0,
        latency_ms=latency,
        backend=predictor.backend,
        correct=correct.tolist(),
    )


@dataclass(frozen=True)
class Verdict:
    """The gate's decision; `reasons` says why a challenger was rejected."""

    passed: bool
    reasons: list[str]
    challenger: Score
    champion: Score | None
    p_value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("challenger", "champion"):
            if out[key] is not None:
                out[key].pop("correct")
        return out

    def table(self) -> str:
        """Challenger against champion, as a Markdown table."""
        rows = [("accuracy", "accuracy"), ("group gap", "group_gap"), ("latency ms", "latency_ms")]
        champ = self.champion
        head = f"| metric | challenger v{self.challenger.version} | "
        head += f"champion v{champ.version} |" if champ else "champion (none) |"
        lines = [head, "|---|---|---|"]
        for title, key in rows:
            theirs = f"{getattr(champ, key):.4f}" if champ else "-"
            lines.append(f"| {title} | {getattr(self.challenger, key):.4f} | {theirs} |")
        for group, value in self.challenger.groups.items():
            theirs = f"{champ.groups.get(group, float('nan')):.4f}" if champ else "-"
            lines.append(f"| group {group} | {value:.4f} | {theirs} |")
        return "\n".join(lines)


def gate(challenger: Score, champion: Score | None, cfg: GateConfig) -> Verdict:
    """Floors for any model; no regression (and optionally a significant gain) over a champion."""
    reasons = []
    if challenger.accuracy < cfg.min_accuracy:
        reasons.append(f"accuracy {challenger.accuracy:.4f} < gate.min_accuracy {cfg.min_accuracy}")
    if challenger.group_gap > cfg.max_group_gap:
        reasons.append(
            f"group gap {challenger.group_gap:.4f} > gate.max_group_gap {cfg.max_group_gap}"
        )
    if challenger.latency_ms > cfg.max_latency_ms:
        reasons.append(
            f"latency {challenger.latency_ms:.1f} ms > gate.max_latency_ms {cfg.max_latency_ms}"
        )
    p_value = None
    if champion is not None:
        drop = champion.accuracy - challenger.accuracy
        if drop > cfg.max_regression:
            reasons.append(
                f"accuracy {challenger.accuracy:.4f} is {drop * 100:.2f} points below champion "
                f"v{champion.version} ({champion.accuracy:.4f}; gate.max_regression "
                f"{cfg.max_regression})"
            )
        for group, theirs in champion.groups.items():
            ours = challenger.groups.get(group)
            if ours is not None and theirs - ours > cfg.max_group_regression:
                reasons.append(
                    f"group {group!r} accuracy {ours:.4f} is {(theirs - ours) * 100:.2f} points "
                    f"below champion's {theirs:.4f} (gate.max_group_regression "
                    f"{cfg.max_group_regression})"
                )
        p_value = mcnemar_p(challenger.correct, champion.correct)
        if cfg.require_significance and p_value >= cfg.significance_level:
            reasons.append(
                f"gain over champion not significant (McNemar p={p_value:.4f} >= "
                f"gate.significance_level {cfg.significance_level})"
            )
    return Verdict(not reasons, reasons, challenger, champion, p_value)


def mcnemar_p(ours: list[bool], theirs: list[bool]) -> float:
    """One-sided exact McNemar p-value that `ours` is right more often than `theirs`."""
    a, b = np.asarray(ours, bool), np.asarray(theirs, bool)
    wins, losses = int((a & ~b).sum()), int((~a & b).sum())
    n = wins + losses
    if n == 0:
        return 1.0
    return float(sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n)


def gate_and_promote(
    name: str, version: str, data_dir: Path | str, params: Params, reason: str
) -> tuple[Verdict, bool]:
    """Gate `version` against the champion of the moment and promote it if it passes."""
    with _lock(name):
        current = champion_version(name)
        challenger = score(name, version, data_dir, params)
        champion = None
        if current is not None and current != version:
            champion = score(name, current, data_dir, params)
        verdict = gate(challenger, champion, params.gate)
        _record_verdict(name, version, verdict)
        if verdict.passed:
            _move_champion(name, version, reason, action="promote")
        return verdict, verdict.passed


def promote(name: str, version: str, reason: str) -> None:
    """Make `version` the champion by hand (no gate), recording who, when and why."""
    with _lock(name):
        try:
            client().get_model_version(name, version)
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
    tags = client().get_registered_model(name).tags
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def list_versions(name: str) -> list[dict[str, Any]]:
    """Every version with its aliases and key tags, newest first."""
    c = client()
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
    c = client()
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
    c = client()
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
    c = client()
    c.set_model_version_tag(name, version, "mmops.gate.passed", str(verdict.passed))
    reasons = "; ".join(verdict.reasons) or "none"
    c.set_model_version_tag(name, version, "mmops.gate.reasons", reasons[:4900])
    champion = verdict.champion.version if verdict.champion else "none"
    c.set_model_version_tag(name, version, "mmops.gate.champion", champion)
    c.set_model_version_tag(
        name, version, "mmops.gate.accuracy", f"{verdict.challenger.accuracy:.6f}"
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
