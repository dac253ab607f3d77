"""`mmops feedback` against a real broker (Tansu), real DVC and git: labelled events, late
labels and predictions in; a validated snapshot, the merge and their DVC versions out."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from mmops.config import Params, load_params
from mmops.data.dataset import load_splits, read_manifest
from mmops.data.demo import make_demo_data
from mmops.data.snapshot import REJECTED, ROW_CHECKS, FeedbackRejected, snapshot_folders
from mmops.data.validate import validate_dataset
from mmops.data.versioning import data_version
from mmops.local.stack import create_topics
from mmops.stream.feedback import collect_feedback
from mmops.stream.replay import dataset_events

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=120)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh git repository with `dvc init`, as a project checkout has."""
    root = tmp_path / "project"
    root.mkdir()
    for cmd in (["git", "init", "-q", "-b", "main"], [str(BIN / "dvc"), "init", "-q"]):
        done = run(cmd, root)
        assert done.returncode == 0, done.stderr
    return root


@pytest.fixture
def stream(bootstrap: str) -> tuple[list[str], dict[str, str]]:
    """Fresh topics (two partitions each) and the params overrides naming them."""
    tag = uuid.uuid4().hex[:8]
    names = {"input": f"events-{tag}", "output": f"predictions-{tag}", "labels": f"fb-{tag}"}
    create_topics(bootstrap, list(names.values()), 2)
    overrides = [
        f"stream.input_topic={names['input']}",
        f"stream.output_topic={names['output']}",
        f"feedback.topic={names['labels']}",
        "validate.workers=1",
    ]
    return overrides, {**names, "group": f"feedback-{tag}"}


def params_for(small_overrides: tuple[str, ...], demo_dir: Path, overrides: list[str]) -> Params:
    return load_params(None, [*small_overrides, f"data.dir={demo_dir}", *overrides])


def send(bootstrap: str, topic: str, values: list[Any]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for value in values:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        key = value.get("id") if isinstance(value, dict) else None
        producer.send(topic, key=key.encode() if isinstance(key, str) else None, value=raw)
    producer.flush()
    producer.close()


def committed(bootstrap: str, group: str, topic: str) -> list[int | None]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    try:
        return [consumer.committed(TopicPartition(topic, p)) for p in range(2)]
    finally:
        consumer.close()


def feedback_cli(project: Path, bootstrap: str, group: str, sets: list[str]) -> dict[str, Any]:
    args = [a for item in sets for a in ("--set", item)]
    cmd = [sys.executable, "-m", "mmops.cli", "feedback", "--timeout-s", "1", "--group", group]
    done = run([*cmd, *args, "--json"], project, KAFKA_BOOTSTRAP_SERVERS=bootstrap)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def live_events(tmp_path: Path, n: int) -> list[dict[str, Any]]:
    live = tmp_path / "live"
    make_demo_data(live, n=n, seed=7)
    events = dataset_events(read_manifest(live).to_dict("records"), live)
    for i, event in enumerate(events):
        event["id"] = f"live-{i}"
    return events


def other(label: str, classes: list[str], skip: int = 0) -> str:
    return [c for c in classes if c != label][skip]


def test_labels_join_their_events_merge_and_version_and_nothing_new_writes_nothing(
    bootstrap: str,
    project: Path,
    stream: tuple[list[str], dict[str, str]],
    demo_dir: Path,
    small_overrides: tuple[str, ...],
    tiny_overrides: tuple[str, ...],
    tmp_path: Path,
) -> None:
    overrides, names = stream
    sets = [*small_overrides, f"data.dir={demo_dir}", *overrides]
    params = params_for(small_overrides, demo_dir, overrides)
    base = load_splits(demo_dir, params)
    classes = sorted(set(base["label"]))
    test_id = base[base["split"] == "test"]["id"].iloc[0]
    train_id = base[base["split"] == "train"]["id"].iloc[0]
    e = live_events(tmp_path, 9)
    e[7]["id"], e[8]["id"] = test_id, train_id
    truth = {x["id"]: x.pop("truth") for x in e}
    own = {0, 1, 2, 3, 7, 8}
    for i in own:
        e[i]["label"] = truth[e[i]["id"]]
    e[4]["label"] = "purple"  # not a class: rejected, and it has no other label
    ids = [x["id"] for x in e]
    relabel = other(truth[ids[1]], classes)
    first, last = other(truth[ids[2]], classes, 0), other(truth[ids[2]], classes, 1)
    send(bootstrap, names["input"], [*e, b"not json"])
    send(
        bootstrap,
        names["labels"],
        [
            {"id": ids[1], "label": relabel},  # overrides the event's own
            {"id": ids[2], "label": first},
            {"id": ids[2], "label": last},  # the last late label wins
            {"id": ids[3], "label": "purple"},  # rejected: ids[3] keeps its own label
            {"id": ids[5], "label": truth[ids[5]]},  # an unlabelled event gets its label late
            {"id": "ghost", "label": classes[0]},  # no such event (yet): waits
            {"id": ids[0]},  # no label: rejected
        ],
    )
    predicted = {ids[0]: truth[ids[0]], ids[1]: truth[ids[1]], ids[2]: last}
    predicted |= {ids[3]: truth[ids[3]], ids[5]: truth[ids[5]]}
    predictions = [
        {"id": i, "label": label, "model": {"name": "m", "version": "1"}}
        for i, label in predicted.items()
    ] + [{"id": ids[0], "label": relabel, "model": {"name": "m", "version": "2"}}]
    send(bootstrap, names["output"], predictions)

    summary = feedback_cli(project, bootstrap, names["group"], sets)

    assert summary["committed"] and summary["rows"] == 7
    assert summary["label_from"] == {"event": 4, "feedback": 3}
    assert summary["rejected"] == {"unknown_label": 2, "not_json": 1, "bad_label": 1}
    assert summary["waiting"] == 1 and summary["unpredicted"] == 2
    assert summary["unlabelled"] == 2  # ids[4] (its only label rejected) and ids[6]
    assert summary["accuracy"] == {
        "m/1": {"model": "m", "version": "1", "events": 5, "correct": 4, "accuracy": 0.8},
        "m/2": {"model": "m", "version": "2", "events": 1, "correct": 0, "accuracy": 0.0},
    }
    [folder] = snapshot_folders(project / "data" / "feedback")
    assert summary["snapshot"] == str(Path("data/feedback") / folder.name)
    rows = read_manifest(folder).set_index("id")
    expected = {i: truth[i] for i in (ids[0], ids[3], ids[5], test_id, train_id)}
    assert rows["label"].to_dict() == {**expected, ids[1]: relabel, ids[2]: last}
    assert set(rows["split"]) == {"train"}
    by_id = {x["id"]: x for x in e}
    for record_id, row in rows.iterrows():
        assert (folder / row["image"]).read_bytes() == base64.b64decode(by_id[record_id]["image"])
        assert row["text"] == by_id[record_id]["text"]
    report = validate_dataset(folder, params)
    assert not [c.name for c in report.failed if c.name in ROW_CHECKS]

    merged_dir = project / "data" / "merged"
    assert validate_dataset(merged_dir, params).success
    merged = read_manifest(merged_dir).set_index("id")
    assert len(merged) == len(base) + 5
    base_test = set(base["id"][base["split"] == "test"])
    assert set(merged.index[merged["split"] == "test"]) == base_test
    assert merged.loc[test_id, "label"] == truth[test_id]  # feedback wins, the row stays in test
    assert merged.loc[train_id, "split"] == "train" and merged.loc[ids[5], "split"] == "train"
    assert (merged_dir / merged.loc[ids[5], "image"]).is_file()
    sources = json.loads((merged_dir / "merge.json").read_text())["sources"]
    assert sources == {"base": len(base) - 2, folder.name: 7}
    for path in (folder, merged_dir):
        assert path.with_name(path.name + ".dvc").is_file()
        version = data_version(path)
        assert (
            version.tracked and summary["versions"][str(path.relative_to(project))] == version.md5
        )
    assert committed(bootstrap, names["group"], names["input"]) != [None, None]
    # ... and the next retrain trains on it (the training's data gate reads its validation).
    from mmops.training.train import train

    tiny = load_params(None, [*tiny_overrides, f"data.dir={merged_dir}"])
    gate = validate_dataset(merged_dir, tiny)
    assert gate.success
    trained = train(merged_dir, tiny, out_dir=tmp_path / "trained", progress=False, validation=gate)
    assert (trained.model_dir / "model.safetensors").is_file()

    again = feedback_cli(project, bootstrap, names["group"], sets)

    assert again["snapshot"] is None and again["rows"] == 0 and not again["committed"]
    assert again["read"] == {} and "no snapshot" in again["message"]
    assert snapshot_folders(project / "data" / "feedback") == [folder]
    assert data_version(merged_dir).tracked  # the merged data is as DVC recorded it

    # Labels for events of the first run: an unlabelled one, and a relabel.
    send(
        bootstrap,
        names["labels"],
        [{"id": ids[6], "label": truth[ids[6]]}, {"id": ids[0], "label": relabel}],
    )
    later = feedback_cli(project, bootstrap, names["group"], sets)

    assert later["rows"] == 2 and later["label_from"] == {"feedback": 2}
    assert later["waiting"] == 1  # still no "ghost" event
    folders = snapshot_folders(project / "data" / "feedback")
    assert len(folders) == 2 and folders[0] == folder
    second = read_manifest(folders[1]).set_index("id")
    assert second["label"].to_dict() == {ids[0]: relabel, ids[6]: truth[ids[6]]}
    assert second.loc[ids[6], "text"] == by_id[ids[6]]["text"]  # read again by its offset
    merged = read_manifest(merged_dir).set_index("id")
    assert len(merged) == len(base) + 6 and merged.loc[ids[0], "label"] == relabel
    assert data_version(merged_dir).tracked


def test_a_snapshot_that_fails_validation_stops_before_any_merge_or_commit(
    bootstrap: str,
    project: Path,
    stream: tuple[list[str], dict[str, str]],
    demo_dir: Path,
    small_overrides: tuple[str, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    overrides, names = stream
    params = params_for(small_overrides, demo_dir, overrides)
    events = live_events(tmp_path, 2)
    for event in events:
        event["label"] = event.pop("truth")
    broken = b"\x89PNG\r\n\x1a\n" + b"\0" * 64  # PNG by its magic, nothing decodable after it
    events[1]["image"] = base64.b64encode(broken).decode()
    send(bootstrap, names["input"], events)
    monkeypatch.chdir(project)

    with pytest.raises(FeedbackRejected) as raised:
        collect_feedback(
            params, {"bootstrap_servers": bootstrap}, timeout_s=2, group_id=names["group"]
        )

    message = str(raised.value)
    assert "snapshot" in message and "image." in message and "events: live-1" in message
    assert not (project / "data" / "merged").exists()
    assert snapshot_folders(project / "data" / "feedback") == []
    assert len(list((project / "data" / "feedback" / REJECTED).glob("*.validation"))) == 1
    assert committed(bootstrap, names["group"], names["input"]) == [None, None]


def test_fewer_labelled_events_than_min_rows_write_nothing_and_commit_nothing(
    bootstrap: str,
    project: Path,
    stream: tuple[list[str], dict[str, str]],
    demo_dir: Path,
    small_overrides: tuple[str, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    overrides, names = stream
    params = params_for(small_overrides, demo_dir, [*overrides, "feedback.min_rows=3"])
    events = live_events(tmp_path, 3)
    events[0]["label"] = events[0]["truth"]
    events[1]["label"] = events[1]["truth"]  # the third has no label
    send(bootstrap, names["input"], events)
    monkeypatch.chdir(project)
    kafka = {"bootstrap_servers": bootstrap}

    capped = collect_feedback(params, kafka, timeout_s=2, max_records=1, group_id=names["group"])
    result = collect_feedback(params, kafka, timeout_s=2, group_id=names["group"])

    assert capped.read == {names["input"]: 1} and not capped.committed
    assert result.read == {names["input"]: 3}  # nothing was committed: all read again
    assert result.snapshot is None and result.rows == 2 and not result.committed
    assert "fewer than feedback.min_rows (3)" in result.message
    assert not (project / "data").exists()
    assert committed(bootstrap, names["group"], names["input"]) == [None, None]
