"""Hyperparameter search (`mmops tune`): Optuna trials, each a nested MLflow run under one parent.

Each trial trains with the values TPE samples from `train.search.space`; its per-epoch val
accuracy feeds a median pruner, so a trial clearly behind the others stops early. The best values
go to a partial params file and to the parent run, and the retrain flow trains with them.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna

from mmops.config import Params, SearchConfig, to_dict
from mmops.environment import mlflow_client
from mmops.tracking.runs import MlflowTracker, configure, flatten, run_name
from mmops.tracking.search_space import Dimension, parse_space, with_overrides, write_params_file
from mmops.training.validation_gate import DataValidation, require_validation

log = logging.getLogger(__name__)

BEST_PARAMS_FILE = "best_params.yaml"
# No pruning until this many trials have finished: the median of one trial is that trial.
PRUNER_STARTUP_TRIALS = 2


@dataclass(frozen=True)
class SearchResult:
    """What a search found: the best values by dotted params key, and where they are recorded."""

    best_overrides: dict[str, Any]
    best_value: float  # the best trial's best val accuracy
    n_trials: int
    n_pruned: int
    parent_run_id: str
    params_file: Path

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "params_file": str(self.params_file)}


class TrialTracker:
    """The training loop's Tracker in a trial: MLflow metrics, and pruning on val accuracy."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.best_val_accuracy = 0.0
        self._mlflow = MlflowTracker()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics(metrics, step)
        accuracy = metrics["val_accuracy"]
        self.best_val_accuracy = max(self.best_val_accuracy, accuracy)
        self.trial.report(accuracy, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"val accuracy {accuracy:.4f} at epoch {step}")


def new_study(search: SearchConfig, trial_epochs: int) -> optuna.Study:
    """A study maximising val accuracy: TPE seeded from `search.seed`, median pruning."""
    # An under-trained model sits near chance for its first epochs, whatever its params: judge
    # a trial from the end of a quarter of its epochs on (steps are 1-based epochs; at least 2).
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=max(2, trial_epochs // 4)
    )
    return optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=search.seed),
        pruner=pruner,
    )


def tune(
    data_dir: Path | str,
    params: Params,
    trials: int | None = None,
    timeout_s: float | None = None,
    out_dir: Path | str | None = None,
    validation_report: Path | str | None = None,
    allow_unvalidated: bool = False,
) -> SearchResult:
    """Search `train.search.space` with Optuna, each trial a nested MLflow run; save the best.

    Trials train only on data that passed validation, as `tracked_train` does.
    """
    from mmops.data.dataset import load_splits
    from mmops.data.versioning import data_version

    cfg = params.train.search
    dims = parse_space(params)  # a bad space fails here, before any run or training
    base = _trial_base(params)
    timeout = cfg.timeout_s if timeout_s is None else timeout_s
    version = data_version(data_dir)
    # Refused data and a dataset that cannot load leave no MLflow run.
    report = validation_report or params.train.validation_report
    validation = require_validation(data_dir, report, allow_unvalidated, data_md5=version.md5)
    load_splits(data_dir, params)
    configure(params)
    name = run_name("tune", version.md5)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial comes from here
    try:
        study = new_study(cfg, base.train.epochs)
        with mlflow.start_run(run_name=name) as parent:
            mlflow.log_params(flatten(to_dict(params)))
            mlflow.set_tags(
                {
                    "mmops.stage": "tune",
                    "data.path": str(data_dir),
                    "data.md5": version.md5,
                    "git.commit": str(version.git_commit),
                    **validation.tags(),
                }
            )
            parent_id = parent.info.run_id
            study.optimize(
                lambda trial: _run_trial(trial, data_dir, base, dims, validation, parent_id, name),
                n_trials=trials or cfg.trials,
                timeout=timeout or None,
            )
            return _finish(study, dims, Path(out_dir or cfg.out_dir), parent_id)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _trial_base(params: Params) -> Params:
    """The params trials start from: `search.epochs` per trial, and the step floor cut to match."""
    cfg, epochs = params.train, params.train.search.epochs
    if not epochs:
        return params
    # Else train.min_steps would raise a short trial on a small dataset back to full length.
    min_steps = cfg.min_steps * epochs // cfg.epochs
    return with_overrides(params, {"train.epochs": epochs, "train.min_steps": min_steps})


def record_search(run_id: str, result: SearchResult) -> None:
    """Record on a training run the search that chose its params: best values, parent run."""
    from mlflow.entities import Param, RunTag

    mlflow_client().log_batch(
        run_id,
        params=[Param(f"search.best.{k}", str(v)) for k, v in result.best_overrides.items()],
        tags=[RunTag("mmops.search.run_id", result.parent_run_id)],
    )


def _run_trial(
    trial: optuna.Trial,
    data_dir: Path | str,
    base: Params,
    dims: tuple[Dimension, ...],
    validation: DataValidation,
    parent_id: str,
    name: str,
) -> float:
    """Train with the trial's sampled values in a nested run; its best val accuracy."""
    from mmops.training.train import train

    sampled = {dim.key: dim.suggest(trial) for dim in dims}
    trial_params = with_overrides(base, sampled)
    tracker, pruned = TrialTracker(trial), False
    child_name = f"{name}-trial-{trial.number}"
    with mlflow.start_run(run_name=child_name, nested=True, parent_run_id=parent_id):
        mlflow.log_params(sampled)
        mlflow.set_tags({"mmops.stage": "tune.trial", "trial": str(trial.number)})
        # Only the score matters; the trial's model and checkpoint go with its folder.
        with tempfile.TemporaryDirectory(prefix="mmops-trial-") as tmp:
            try:
                train(
                    data_dir,
                    trial_params,
                    tmp,
                    tracker=tracker,
                    resume=False,
                    progress=False,
                    validation=validation,
                )
            except optuna.TrialPruned:
                pruned = True
        state = "pruned" if pruned else "complete"
        mlflow.set_tag("state", state)
        mlflow.log_metric("best_val_accuracy", tracker.best_val_accuracy)
    log.info(
        "trial %d %s: best val accuracy %.4f with %s",
        trial.number,
        state,
        tracker.best_val_accuracy,
        sampled,
    )
    if pruned:
        raise optuna.TrialPruned()
    return tracker.best_val_accuracy


def _finish(
    study: optuna.Study, dims: tuple[Dimension, ...], out: Path, parent_id: str
) -> SearchResult:
    """Log the best trial to the parent run and write its values as a params file."""
    # Pruning needs finished trials to compare with, so the first ones always complete.
    states = [t.state for t in study.trials]
    n_pruned = states.count(optuna.trial.TrialState.PRUNED)
    best = study.best_trial
    overrides = {dim.key: best.params[dim.key] for dim in dims}
    params_file = write_params_file(out / BEST_PARAMS_FILE, overrides)
    mlflow.log_params({f"best.{key}": value for key, value in overrides.items()})
    mlflow.log_metrics(
        {"best_val_accuracy": float(best.value), "trials": len(states), "trials_pruned": n_pruned}
    )
    mlflow.set_tag("best_trial", str(best.number))
    mlflow.log_artifact(str(params_file), "tune")
    log.info("best of %d trials: val accuracy %.4f with %s", len(states), best.value, overrides)
    return SearchResult(
        best_overrides=overrides,
        best_value=float(best.value),
        n_trials=len(states),
        n_pruned=n_pruned,
        parent_run_id=parent_id,
        params_file=params_file,
    )
