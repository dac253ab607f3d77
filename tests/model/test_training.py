from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmops.config import Params, load_params
from mmops.data.dataset import load_splits
from mmops.model.preprocess import Collator, MultimodalDataset, model_inputs
from mmops.model.storage import WEIGHTS_FILE, LoadedModel, load_model
from mmops.training import train as train_module
from mmops.training.history import CURVE_COLUMNS, HISTORY_CSV_FILE
from mmops.training.progress import TrainProgress
from mmops.training.steps import LossAccuracy
from mmops.training.train import CHECKPOINT_FILE, HISTORY_FILE, MODEL_DIR, TrainResult, train
from mmops.training.validation_gate import DataValidation

# Wall-clock measurements: the only history entries that may differ between identical runs.
TIMINGS = ("epoch_seconds", "train_samples_per_s")


def without_timings(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in entry.items() if k not in TIMINGS} for entry in history]


def val_batch(loaded: LoadedModel, demo_dir: Path, params: Params) -> dict[str, torch.Tensor]:
    frame = load_splits(demo_dir, params)
    rows = frame[frame["split"] == "val"].head(16)
    config = loaded.model.config
    index = {label: i for i, label in enumerate(loaded.labels)}
    dataset = MultimodalDataset(demo_dir, rows, index, config.image_size)
    collate = Collator(loaded.tokenizer, config.image_size, config.max_text_length)
    return collate([dataset[i] for i in range(len(dataset))])


@torch.no_grad()
def logits(loaded: LoadedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return loaded.model(**model_inputs(batch, torch.device("cpu"))).logits


class Interrupted(Exception):
    pass


class StepTracker:
    """Records the epochs it is told about; with `stop_after`, dies there like a preempted job.

    The loop writes an epoch's checkpoint before it calls the tracker, so the checkpoint left
    behind holds exactly `stop_after` epochs.
    """

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after = stop_after
        self.steps: list[int] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.steps.append(step)
        if step == self.stop_after:
            raise Interrupted


def test_training_writes_model_checkpoint_and_history(
    trained_run: TrainResult, train_params: Params
) -> None:
    out = trained_run.model_dir.parent
    epochs = train_params.train.epochs

    assert trained_run.model_dir == out / MODEL_DIR
    assert [entry["epoch"] for entry in trained_run.history] == list(range(1, epochs + 1))
    assert trained_run.epochs_run == epochs and not trained_run.stopped_early
    assert trained_run.device == "cpu" and trained_run.world_size == 1
    assert trained_run.parameters > 0
    assert len(trained_run.labels) == 9  # the demo data's colours, shapes and sizes
    best = trained_run.history[trained_run.best_epoch - 1]
    assert best["val_accuracy"] == trained_run.best_val_accuracy
    assert trained_run.best_val_accuracy == max(e["val_accuracy"] for e in trained_run.history)

    loaded = load_model(trained_run.model_dir)
    assert loaded.labels == trained_run.labels
    assert loaded.meta["trained_epochs"] == trained_run.best_epoch
    assert loaded.meta["contrastive"] is True

    checkpoint = torch.load(out / CHECKPOINT_FILE, weights_only=False)
    saved = TrainProgress.from_dict(checkpoint["state"])
    assert saved.epoch == epochs and saved.best_epoch == trained_run.best_epoch
    assert saved.history == trained_run.history
    assert json.loads((out / HISTORY_FILE).read_text()) == json.loads(
        json.dumps(trained_run.to_dict())
    )


def read_curves(out: Path) -> list[dict[str, str]]:
    with (out / HISTORY_CSV_FILE).open(newline="") as file:
        return list(csv.DictReader(file))


def test_history_csv_has_a_row_of_curves_per_epoch(
    trained_run: TrainResult, early_stopped: TrainResult
) -> None:
    for run in (trained_run, early_stopped):
        rows = read_curves(run.model_dir.parent)

        assert len(rows) == run.epochs_run
        assert tuple(rows[0]) == CURVE_COLUMNS
        assert [int(row["epoch"]) for row in rows] == list(range(1, run.epochs_run + 1))
        for row, entry in zip(rows, run.history, strict=True):
            assert {k: float(v) for k, v in row.items()} == {k: entry[k] for k in CURVE_COLUMNS}


def test_train_loss_decreases(trained_run: TrainResult) -> None:
    first, last = trained_run.history[0], trained_run.history[-1]

    assert last["train_loss"] < first["train_loss"]
    assert last["lr"] < first["lr"]  # cosine decay towards the end


def test_same_seed_gives_identical_weights_and_history(
    demo_dir: Path,
    demo_validation: DataValidation,
    tiny_overrides: tuple[str, ...],
    tmp_path: Path,
) -> None:
    params = load_params(None, tiny_overrides)
    first = train(demo_dir, params, tmp_path, progress=False, validation=demo_validation)
    best = load_file(first.model_dir / WEIGHTS_FILE)
    final = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)["model"]

    # Same folder without resume: the checkpoint left there must not be picked up either.
    tracker = StepTracker()
    again = train(
        demo_dir,
        params,
        tmp_path,
        tracker=tracker,
        resume=False,
        progress=False,
        validation=demo_validation,
    )

    assert tracker.steps == [1, 2]
    assert without_timings(again.history) == without_timings(first.history)
    best_again = load_file(again.model_dir / WEIGHTS_FILE)
    final_again = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)["model"]
    for weights, weights_again in ((best, best_again), (final, final_again)):
        assert weights.keys() == weights_again.keys()
        for name, tensor in weights.items():
            assert torch.equal(tensor, weights_again[name]), name


def test_dataloader_workers_do_not_change_the_result(
    demo_dir: Path,
    demo_validation: DataValidation,
    tiny_overrides: tuple[str, ...],
    tmp_path: Path,
) -> None:
    # The default trains with decoding worker processes; augmentation and shuffling are drawn
    # in the main process, so the workers must leave the result bit for bit the same.
    inline = train(
        demo_dir,
        load_params(None, tiny_overrides),
        tmp_path / "0",
        progress=False,
        validation=demo_validation,
    )
    params = load_params(None, [*tiny_overrides, "train.num_workers=2"])
    workers = train(demo_dir, params, tmp_path / "2", progress=False, validation=demo_validation)

    assert without_timings(workers.history) == without_timings(inline.history)
    expected = load_file(inline.model_dir / WEIGHTS_FILE)
    for name, tensor in load_file(workers.model_dir / WEIGHTS_FILE).items():
        assert torch.equal(tensor, expected[name]), name


def test_interrupted_run_resumes_to_the_uninterrupted_result(
    demo_dir: Path,
    demo_validation: DataValidation,
    train_params: Params,
    trained_run: TrainResult,
    tmp_path: Path,
) -> None:
    with pytest.raises(Interrupted):
        train(
            demo_dir,
            train_params,
            tmp_path,
            tracker=StepTracker(stop_after=2),
            progress=False,
            validation=demo_validation,
        )
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)["state"]["epoch"] == 2
    tracker = StepTracker()

    resumed = train(
        demo_dir,
        train_params,
        tmp_path,
        tracker=tracker,
        resume=True,
        progress=False,
        validation=demo_validation,
    )

    assert tracker.steps == [3, 4]  # it resumed, rather than started over
    assert resumed.epochs_run == trained_run.epochs_run
    assert resumed.best_epoch == trained_run.best_epoch
    expected = without_timings(trained_run.history)
    for entry, want in zip(without_timings(resumed.history), expected, strict=True):
        assert entry == pytest.approx(want, rel=1e-6, abs=1e-7)
    original, again = load_model(trained_run.model_dir), load_model(resumed.model_dir)
    batch = val_batch(original, demo_dir, train_params)
    torch.testing.assert_close(logits(again, batch), logits(original, batch), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def frozen_params(tiny_overrides: tuple[str, ...]) -> Params:
    """lr 0: the weights stay at their random start, a model at chance; patience 1."""
    return load_params(
        None,
        [*tiny_overrides, "train.epochs=4", "train.lr=0", "train.early_stopping_patience=1"],
    )


@pytest.fixture(scope="module")
def early_stopped(
    demo_dir: Path,
    demo_validation: DataValidation,
    frozen_params: Params,
    tmp_path_factory: pytest.TempPathFactory,
) -> TrainResult:
    out = tmp_path_factory.mktemp("early_stopped")
    # Val scores that never improve on the first epoch's, above chance: patience runs out after
    # epoch 2. (lr 0 alone no longer fixes them: batch norm statistics still move.)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "chance_floor", lambda labels: 0.0)
        patch.setattr(train_module, "evaluate_loss", lambda *args: LossAccuracy(1.0, 0.5))
        return train(demo_dir, frozen_params, out, progress=False, validation=demo_validation)


def test_a_model_at_chance_is_waited_out_not_stopped(
    demo_dir: Path, demo_validation: DataValidation, frozen_params: Params, tmp_path: Path
) -> None:
    result = train(demo_dir, frozen_params, tmp_path, progress=False, validation=demo_validation)

    assert not result.stopped_early
    assert result.epochs_run == frozen_params.train.epochs


def test_early_stopping_when_val_accuracy_cannot_improve(
    early_stopped: TrainResult, frozen_params: Params
) -> None:
    assert early_stopped.stopped_early
    assert early_stopped.epochs_run == 2 < frozen_params.train.epochs
    assert early_stopped.best_epoch == 1
    assert len(early_stopped.history) == 2
    history = json.loads((early_stopped.model_dir.parent / HISTORY_FILE).read_text())
    assert history["stopped_early"] is True


def test_resuming_an_early_stopped_run_trains_no_further(
    demo_dir: Path,
    demo_validation: DataValidation,
    frozen_params: Params,
    early_stopped: TrainResult,
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    shutil.copytree(early_stopped.model_dir.parent, out)

    again = train(
        demo_dir, frozen_params, out, resume=True, progress=False, validation=demo_validation
    )

    assert again.epochs_run == early_stopped.epochs_run
    assert again.history == early_stopped.history
    assert again.stopped_early


def test_prediction_does_not_depend_on_batch_padding(
    trained_run: TrainResult, demo_dir: Path, train_params: Params
) -> None:
    loaded = load_model(trained_run.model_dir)
    batch = val_batch(loaded, demo_dir, train_params)
    lengths = batch["attention_mask"].sum(1)
    short = int(lengths.argmin())
    assert lengths[short] < batch["input_ids"].shape[1]  # the short text is padded in the batch

    alone = {key: value[short : short + 1] for key, value in batch.items()}
    for key in ("input_ids", "attention_mask"):
        alone[key] = alone[key][:, : int(lengths[short])]

    torch.testing.assert_close(
        logits(loaded, alone)[0], logits(loaded, batch)[short], rtol=1e-4, atol=1e-5
    )


TORCHRUN_2_CPUS = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node=2",
]

DDP_SCRIPT = """
import json
import sys

from mmops.config import load_params
from mmops.training.train import train
from mmops.training.validation_gate import require_validation

data_dir, out_dir, report = sys.argv[1], sys.argv[2], sys.argv[4]
params = load_params(None, json.loads(sys.argv[3]))
# Each process checks the data it trains on against the report, as `mmops train` does.
validation = require_validation(data_dir, report)
train(data_dir, params, out_dir=out_dir, progress=False, validation=validation)
"""


@pytest.mark.slow
def test_distributed_training_on_two_cpu_processes(
    demo_dir: Path,
    demo_validation: DataValidation,
    tiny_overrides: tuple[str, ...],
    tmp_path: Path,
) -> None:
    script = tmp_path / "train_ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    overrides = [*tiny_overrides, "train.epochs=1"]
    command = [
        *TORCHRUN_2_CPUS,
        str(script),
        str(demo_dir),
        str(out),
        json.dumps(overrides),
        demo_validation.report,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads((out / HISTORY_FILE).read_text())
    assert history["world_size"] == 2
    assert history["epochs_run"] == 1
    assert load_model(out / MODEL_DIR).labels == history["labels"]


@pytest.mark.slow
def test_torchrun_mmops_train_tracks_one_run_from_rank_zero(
    demo_dir: Path,
    demo_validation: DataValidation,
    tiny_overrides: tuple[str, ...],
    tmp_path: Path,
) -> None:
    """The README's `torchrun ... mmops train`: every rank trains, only rank 0 talks to MLflow."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mmops = str(Path(sys.executable).parent / "mmops")
    sets = [word for key in (*tiny_overrides, "train.epochs=1") for word in ("--set", key)]
    command = [
        *TORCHRUN_2_CPUS,
        "--no-python",
        mmops,
        "train",
        "--data",
        str(demo_dir),
        "--out",
        str(tmp_path / "out"),
        "--validation-report",
        demo_validation.report,
        "--json",
        *sets,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": store}

    done = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )

    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    [summary] = summaries  # one rank reports
    runs = MlflowClient(store).search_runs(
        [e.experiment_id for e in MlflowClient(store).search_experiments()]
    )
    assert [r.info.run_id for r in runs] == [summary["run_id"]]
    assert json.loads((tmp_path / "out" / HISTORY_FILE).read_text())["world_size"] == 2
