"""Labelled feedback as pure logic: joins, overrides, rejections, accuracy, the merge, min_rows."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from mmops.data.feedback import (
    Collected,
    FeedbackState,
    LateLabel,
    Location,
    enough_rows,
    in_order,
    join_labels,
    merge_rows,
    online_accuracy,
    snapshot_record,
)
from mmops.data.snapshot import (
    ROW_CHECKS,
    FeedbackError,
    FeedbackRejected,
    require_dvc,
    snapshot_folders,
)

CLASSES = ("cat", "dog", "fox")
PNG = b"\x89PNG\r\n\x1a\n" + b"rest"


def at(offset: int, partition: int = 0, topic: str = "events", ts: int = -1) -> Location:
    return Location(topic, partition, offset, ts)


def event(record_id: str, label: str | None = None, **extra: Any) -> dict[str, Any]:
    found = {"id": record_id, "text": f"text of {record_id}", "image": None, **extra}
    if label is not None:
        found["label"] = label
    return found


def collected(*events: dict[str, Any], labels: tuple[tuple[str, str], ...] = ()) -> Collected:
    into = Collected()
    for offset, item in enumerate(events):
        into.add_event(item, at(offset))
    for offset, (record_id, label) in enumerate(labels):
        into.add_label({"id": record_id, "label": label}, at(offset, topic="labels"))
    return into


def labels_of(joined: Any) -> dict[str, tuple[str, str]]:
    return {row.id: (row.label, row.label_from) for row in joined.rows}


def test_an_event_with_its_own_label_is_written_and_one_without_any_label_is_not() -> None:
    joined = join_labels(collected(event("a", "cat"), event("b")), FeedbackState(), CLASSES)

    assert labels_of(joined) == {"a": ("cat", "event")}
    assert joined.rows[0].event is not None  # in hand: no need to read it again
    assert not joined.rejections and not joined.waiting


def test_a_late_label_overrides_the_events_own_and_the_last_late_label_wins() -> None:
    run = collected(
        event("a", "cat"),
        event("b"),
        labels=(("a", "dog"), ("b", "cat"), ("b", "fox")),
    )

    joined = join_labels(run, FeedbackState(), CLASSES)

    assert labels_of(joined) == {"a": ("dog", "feedback"), "b": ("fox", "feedback")}
    # b had no label of its own: it is kept by location only and read again from the topic
    assert [row.event is None for row in joined.rows] == [False, True]


def test_late_labels_apply_in_partition_order_not_arrival_order() -> None:
    first, last = LateLabel("a", "cat", at(3)), LateLabel("a", "dog", at(9))
    assert [x.label for x in in_order([last, first])] == ["cat", "dog"]
    # Across partitions only the broker timestamp can order them.
    early = LateLabel("a", "cat", at(9, partition=1, ts=100))
    late = LateLabel("a", "fox", at(1, partition=0, ts=200))
    assert [x.label for x in in_order([late, early])] == ["cat", "fox"]


def test_unknown_labels_are_rejected_with_the_reason_and_the_event_keeps_its_label() -> None:
    run = collected(
        event("a", "cat"),
        event("b", "wolf"),
        labels=(("a", "wolf"), ("a", "dog"), ("a", "horse")),
    )

    joined = join_labels(run, FeedbackState(), CLASSES)

    assert labels_of(joined) == {"a": ("dog", "feedback")}  # "horse" came last but is unknown
    reasons = [(r.id, r.source, r.reason) for r in joined.rejections]
    assert sorted(reasons) == [
        ("a", "label", "unknown_label"),
        ("a", "label", "unknown_label"),
        ("b", "event", "unknown_label"),
    ]
    detail = next(r.detail for r in joined.rejections if r.id == "b")
    assert "'wolf' is not a class of the dataset (cat, dog, fox)" in detail


def test_malformed_labels_and_own_labels_are_rejected_naming_the_field() -> None:
    run = Collected()
    run.add_label(["not", "an", "object"], at(0, topic="labels"))
    run.add_label({"label": "cat"}, at(1, topic="labels"))
    run.add_label({"id": "a", "label": 3}, at(2, topic="labels"))
    run.add_event({**event("b"), "label": ["cat"]}, at(0))

    assert [(r.id, r.reason) for r in run.rejections] == [
        (None, "not_object"),
        (None, "bad_id"),
        ("a", "bad_label"),
        ("b", "bad_label"),
    ]
    assert "label: expected a non-empty string, got 3" in run.rejections[2].detail
    assert not run.labels and "b" in run.events  # still there for a late label to find


def test_a_label_for_an_unseen_event_waits_and_joins_it_in_a_later_run() -> None:
    first = collected(event("a", "cat"), labels=(("ghost", "dog"),))
    joined = join_labels(first, FeedbackState(), CLASSES)
    assert list(joined.waiting) == ["ghost"] and labels_of(joined) == {"a": ("cat", "event")}

    state = FeedbackState().advance(first, joined.waiting, {})
    later = collected(event("ghost"))
    again = join_labels(later, FeedbackState.from_dict(state.to_dict()), CLASSES)

    assert labels_of(again) == {"ghost": ("dog", "feedback")} and not again.waiting


def test_a_late_label_for_an_event_of_an_earlier_run_reads_it_again_by_its_location() -> None:
    first = collected(event("a", "cat"), event("b"))
    state = FeedbackState().advance(first, {}, {})
    later = collected(labels=(("b", "fox"), ("a", "dog")))

    joined = join_labels(later, state, CLASSES)

    assert labels_of(joined) == {"a": ("dog", "feedback"), "b": ("fox", "feedback")}
    assert [(row.event, row.location.offset) for row in joined.rows] == [(None, 0), (None, 1)]


def test_the_state_forgets_events_the_topic_no_longer_holds() -> None:
    run = collected(event("a"), event("b"), event("c"))
    run.add_prediction({"id": "a", "label": "cat", "model": {"name": "m", "version": "1"}})

    state = FeedbackState().advance(run, {}, {("events", 0): 2})

    assert list(state.events) == ["c"] and state.predictions == {}


def test_online_accuracy_is_per_model_version_and_counts_unpredicted_events() -> None:
    run = collected(event("a", "cat"), event("b", "dog"), event("c", "fox"))
    for record_id, label, version in (("a", "cat", "1"), ("b", "cat", "1"), ("a", "dog", "2")):
        run.add_prediction(
            {"id": record_id, "label": label, "model": {"name": "m", "version": version}}
        )
    run.add_prediction({"id": "x", "scores": {}})  # not a prediction: skipped
    joined = join_labels(run, FeedbackState(), CLASSES)

    accuracy, unpredicted = online_accuracy(joined.rows, run.predictions)

    assert {k: (v["events"], v["correct"], v["accuracy"]) for k, v in accuracy.items()} == {
        "m/1": (2, 1, 0.5),
        "m/2": (1, 0, 0.0),
    }
    assert unpredicted == 1


def test_a_snapshot_record_holds_the_image_as_a_file_and_rejects_bad_base64() -> None:
    item = event("a/../b", image=base64.b64encode(PNG).decode(), group="field")
    record, data = snapshot_record(item, "cat", "train")

    assert data == PNG
    assert record["image"].startswith("images/") and record["image"].endswith(".png")
    assert "/.." not in record["image"]  # the file name comes from a hash of the id
    assert {k: record[k] for k in ("id", "label", "split", "group")} == {
        "id": "a/../b",
        "label": "cat",
        "split": "train",
        "group": "field",
    }
    assert snapshot_record(event("n", image=None), "cat", "train") == (
        {"id": "n", "image": None, "text": "text of n", "label": "cat", "split": "train"},
        None,
    )
    with pytest.raises(ValueError, match="image: not base64"):
        snapshot_record(event("z", image="%%% not base64"), "cat", "train")


def base_rows() -> list[dict[str, Any]]:
    return [
        {"id": "t1", "image": "images/t1.png", "label": "cat", "split": "test"},
        {"id": "v1", "image": "images/v1.png", "label": "cat", "split": "val"},
        {"id": "r1", "image": "images/r1.png", "label": "cat", "split": "train"},
    ]


def fb(record_id: str, label: str) -> dict[str, Any]:
    return {"id": record_id, "image": f"images/{record_id}.png", "label": label, "split": "x"}


def test_the_merge_keeps_current_rows_and_their_splits_and_adds_feedback_to_its_split() -> None:
    merge = merge_rows(base_rows(), [("s1", [fb("new", "dog")])], "train")

    by_id = {row.record["id"]: row for row in merge.rows}
    assert {i: r.record["split"] for i, r in by_id.items()} == {
        "t1": "test",
        "v1": "val",
        "r1": "train",
        "new": "train",
    }
    assert by_id["new"].record["image"] == "feedback/s1/images/new.png"
    assert by_id["new"].image_from == "images/new.png" and by_id["new"].source == "s1"
    assert dict(merge.sources()) == {"base": 3, "s1": 1}


def test_feedback_wins_a_duplicate_id_but_never_moves_a_row_out_of_test_or_val() -> None:
    snapshots = [("s1", [fb("t1", "dog"), fb("v1", "dog"), fb("r1", "dog")])]

    merge = merge_rows(base_rows(), snapshots, "train")

    records = {row.record["id"]: row.record for row in merge.rows}
    assert {i: (r["label"], r["split"]) for i, r in records.items()} == {
        "t1": ("dog", "test"),
        "v1": ("dog", "val"),
        "r1": ("dog", "train"),
    }
    [stats] = merge.snapshots
    assert (stats.added, stats.replaced, stats.kept_split) == (0, 3, ["t1", "v1"])
    assert [row.record["id"] for row in merge.rows] == ["t1", "v1", "r1"]  # order kept


def test_a_later_snapshot_wins_over_an_earlier_one() -> None:
    merge = merge_rows([], [("s1", [fb("a", "cat")]), ("s2", [fb("a", "fox")])], "val")

    [row] = merge.rows
    assert (row.record["label"], row.record["split"], row.source) == ("fox", "val", "s2")


def test_a_snapshot_needs_at_least_min_rows_labelled_events() -> None:
    assert not enough_rows(0, 1)
    assert not enough_rows(2, 3)
    assert enough_rows(3, 3)


def test_a_snapshot_is_checked_row_by_row_not_for_class_counts_or_split_sizes() -> None:
    assert {"image.decodes", "label.in_set", "id.unique", "text.length"} <= set(ROW_CHECKS)
    assert not {"classes.min_examples", "splits.min_size", "splits.leakage"} & set(ROW_CHECKS)


def test_snapshots_are_taken_oldest_first_and_other_folders_ignored(tmp_path: Path) -> None:
    for name in ("20260102T000000Z", "20260101T000000Z-2", "20260101T000000Z", ".rejected"):
        (tmp_path / name).mkdir()
    (tmp_path / "20260101T000000Z.dvc").write_text("outs: []\n")

    assert [p.name for p in snapshot_folders(tmp_path)] == [
        "20260101T000000Z",
        "20260101T000000Z-2",
        "20260102T000000Z",
    ]


def test_outside_a_dvc_repository_the_run_stops_saying_so(tmp_path: Path) -> None:
    with pytest.raises(FeedbackError, match=r"not inside one DVC repository.*dvc init"):
        require_dvc(tmp_path / "data" / "feedback", tmp_path / "data" / "merged")
    (tmp_path / ".dvc").mkdir()
    assert require_dvc(tmp_path / "data" / "feedback", tmp_path / "data" / "merged") == tmp_path


def test_the_state_survives_its_json_round_trip() -> None:
    run = collected(event("a", "cat"), labels=(("ghost", "dog"),))
    run.add_prediction({"id": "a", "label": "cat", "model": {"name": "m", "version": "1"}})
    joined = join_labels(run, FeedbackState(), CLASSES)
    state = FeedbackState().advance(run, joined.waiting, {})

    again = FeedbackState.from_dict(json.loads(json.dumps(state.to_dict())))

    assert again == state


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def result(self, raise_on_failure: bool = True) -> BaseException:
        return self.error


def test_the_flow_task_retries_a_broker_that_did_not_answer_never_rejected_data() -> None:
    from kafka.errors import KafkaTimeoutError

    from mmops.data.validate import ValidationReport
    from mmops_flows.feedback import _broker_hiccup

    rejected = FeedbackRejected("snapshot: image.decodes failed", ValidationReport("d", None, ()))
    assert _broker_hiccup(None, None, _Failed(KafkaTimeoutError("no broker")))
    assert not _broker_hiccup(None, None, _Failed(rejected))
    assert not _broker_hiccup(None, None, _Failed(FeedbackError("not a DVC repository")))
