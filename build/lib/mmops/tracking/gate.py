"""The challenger-versus-champion gate: both scored on the current test split, then compared."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from mmops.config import GateConfig, Params
from mmops.data.dataset import split_rows
from mmops.evaluation.records import BaselineResult, ZeroShotResult


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
    from mmops.data.dataset import load_splits
    from mmops.serving.predictor import Predictor
    from mmops.serving.runners import cycled_batch, measure_latency

    predictor = Predictor.load(f"models:/{name}/{version}", params.predict.backend, params.predict)
    frame = load_splits(data_dir, params)
    test = split_rows(frame, "test", data_dir, needed_by="the gate")
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
    baseline: BaselineResult | None = None  # the classical model on the same test split
    zero_shot: ZeroShotResult | None = None  # the dual encoder's zero-shot, with model.pretrained

    def table(self) -> str:
        """Challenger against champion (and the baseline), as a Markdown table."""
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
        floors = []
        if self.baseline is not None:
            floors.append((f"baseline ({self.baseline.kind}, ", self.baseline.test_accuracy))
        if self.zero_shot is not None:
            floors.append(("zero-shot (", self.zero_shot.test_accuracy))
        for name, base in floors:
            theirs = f"{champ.accuracy - base:+.4f}" if champ else "-"
            lines.append(
                f"| gain over {name}accuracy {base:.4f}) | "
                f"{self.challenger.accuracy - base:+.4f} | {theirs} |"
            )
        return "\n".join(lines)


def gate(
    challenger: Score,
    champion: Score | None,
    cfg: GateConfig,
    baseline: BaselineResult | None = None,
    zero_shot: ZeroShotResult | None = None,
) -> Verdict:
    """Floors for any model, a gain over the better of the classical baseline and zero-shot; no
    regression (and optionally a significant gain) over a champion."""
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
    below = below_baseline(challenger.accuracy, cfg, baseline, zero_shot)
    if below is not None:
        reasons.append(below)
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
    return Verdict(not reasons, reasons, challenger, champion, p_value, baseline, zero_shot)


def below_baseline(
    accuracy: float,
    cfg: GateConfig,
    baseline: BaselineResult | None,
    zero_shot: ZeroShotResult | None,
) -> str | None:
    """Why `accuracy` falls short of the better baseline plus gate.min_gain_over_baseline, naming
    that baseline and both figures; None when it does not (or there is no baseline)."""
    floors = []
    if baseline is not None:
        floors.append((f"the {baseline.kind} baseline", baseline.test_accuracy))
    if zero_shot is not None:
        floors.append(("zero-shot", zero_shot.test_accuracy))
    if not floors:
        return None
    name, floor = max(floors, key=lambda f: f[1])  # a tie names the classical baseline
    needed = floor + cfg.min_gain_over_baseline
    if accuracy >= needed:
        return None
    both = ""
    if len(floors) > 1:
        both = "; the better of " + " and ".join(f"{n} {a:.4f}" for n, a in floors)
    owner = "the zero-shot baseline" if name == "zero-shot" else name
    return (
        f"accuracy {accuracy:.4f} does not beat {owner}'s {floor:.4f} by "
        f"gate.min_gain_over_baseline {cfg.min_gain_over_baseline} (needs {needed:.4f}{both})"
    )


def mcnemar_p(ours: list[bool], theirs: list[bool]) -> float:
    """One-sided exact McNemar p-value that `ours` is right more often than `theirs`."""
    a, b = np.asarray(ours, bool), np.asarray(theirs, bool)
    wins, losses = int((a & ~b).sum()), int((~a & b).sum())
    if wins + losses == 0:
        return 1.0  # no discordant pair: no evidence either way (binomtest needs n >= 1)
    return float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)
