"""The resume checkpoint holds tensors and plain values only, and loading runs no pickled code."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmops.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mmops.training.optim import warmup_cosine
from mmops.training.progress import TrainProgress


def training_state(
    seed: int,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(
        [
            {"params": [model[0].weight], "weight_decay": 0.01},
            {"params": [model[0].bias, *model[1].parameters()], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(2, 10))
    return model, optimizer, scheduler


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> None:
    loss = model(torch.ones(2, 4)).square().sum()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _planted(marker: str) -> dict:
    """What a planted checkpoint runs when unpickled without weights_only."""
    Path(marker).write_text("ran")
    return {}


class Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_planted, (self.marker,))


def test_a_checkpoint_round_trips_through_a_weights_only_load(tmp_path: Path) -> None:
    model, optimizer, scheduler = training_state(0)
    step(model, optimizer, scheduler)
    progress = TrainProgress(epoch=1, best_epoch=1, history=[{"epoch": 1, "val_loss": 0.5}])
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, optimizer, scheduler, progress)

    # Every part loads under torch's own weights-only unpickler.
    torch.load(path, weights_only=True)
    fresh, fresh_optimizer, fresh_scheduler = training_state(1)
    loaded = load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler, torch.device("cpu"))

    assert loaded == progress and loaded.best_val_loss == math.inf
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    step(model, optimizer, scheduler)
    step(fresh, fresh_optimizer, fresh_scheduler)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    assert list(tmp_path.iterdir()) == [path]


def test_a_checkpoint_of_the_older_code_still_resumes(tmp_path: Path) -> None:
    model, optimizer, scheduler = training_state(0)
    step(model, optimizer, scheduler)
    path = tmp_path / "checkpoint.pt"
    # As the first checkpointing code wrote it: a plain dict, progress without `floor`.
    old_state = {"epoch": 3, "best_val_accuracy": 0.5, "best_val_loss": 1.0, "best_epoch": 2}
    state = {**old_state, "bad_epochs": 1, "history": []}
    saved = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": state,
    }
    torch.save(saved, path)

    fresh = training_state(1)
    progress = load_checkpoint(path, *fresh, torch.device("cpu"))

    assert progress == TrainProgress(**state)


def test_a_checkpoint_with_a_pickled_object_is_refused_without_running_it(
    tmp_path: Path,
) -> None:
    model, optimizer, scheduler = training_state(0)
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint.pt"
    saved = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": Planted(marker),
    }
    torch.save(saved, path)

    with pytest.raises(CheckpointError, match="tensors and plain values only") as info:
        load_checkpoint(path, model, optimizer, scheduler, torch.device("cpu"))

    assert not marker.exists()
    message = str(info.value)
    assert str(path) in message and "_planted" in message and "--resume" in message


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"", "not a readable checkpoint"), (b"garbage", "refused")],
)
def test_a_file_that_is_no_checkpoint_is_named(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path, *training_state(0), torch.device("cpu"))
    assert str(path) in str(info.value)


def test_a_checkpoint_without_its_parts_is_named(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="no optimizer, scheduler, state"):
        load_checkpoint(path, *training_state(0), torch.device("cpu"))


def test_a_save_cut_short_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer, scheduler = training_state(0)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, optimizer, scheduler, TrainProgress(epoch=1))
    real_save = torch.save

    def killed(obj: object, target: Path) -> None:
        real_save(obj, target)
        Path(target).write_bytes(Path(target).read_bytes()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, optimizer, scheduler, TrainProgress(epoch=2))
    monkeypatch.undo()

    progress = load_checkpoint(path, *training_state(1), torch.device("cpu"))
    assert progress.epoch == 1
