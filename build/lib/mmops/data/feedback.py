"""Labelled feedback as pure logic: events, late labels and predictions joined into labelled
rows, online accuracy per model version, and feedback rows merged into a dataset's rows.

A late label overrides the event's own and the last late label wins; a label outside the
dataset's classes is rejected (the event keeps the label it had), and an event left without a
label is not written. What one run cannot settle (labels whose event has not been seen, where
each seen event lies on the input topic) is carried to the next run in a `FeedbackState`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mmops.data.dataset import SPLITS

# Splits a feedback row never takes a row out of: they measure the model, so they stay fixed.
HELD_OUT = ("val", "test")
MAX_CLASSES_SHOWN = 12


@dataclass(frozen=True)
class Location:
    """Where a record lies on its topic; `timestamp` is Kafka's, in epoch milliseconds."""

    topic: str
    partition: int
    offset: int
    timestamp: int = -1


@dataclass(frozen=True)
class Rejection:
    """A record or label left out, with a short `reason` code and a `detail` for a person."""

    id: str | None
    source: str  # "event" | "label" | "prediction"
    reason: str
    detail: str
    location: Location | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LateLabel:
    id: str
    label: str
    location: Location


@dataclass(frozen=True)
class Prediction:
    id: str
    label: str
    model: str
    version: str

    @property
    def key(self) -> str:
        return f"{self.model}/{self.version}"


@dataclass(frozen=True)
class LabelledEvent:
    """An event to write with its final label; `event` is None when its content is not in
    hand and must be read again from `location`."""

    id: str
    label: str
    label_from: str  # "event" (its own label) | "feedback" (a late label)
    location: Location
    event: Mapping[str, Any] | None = None


@dataclass
class Collected:
    """What one run read from the input, feedback and prediction topics."""

    label_field: str = "label"
    events: dict[str, Location] = field(default_factory=dict)  # each id's latest occurrence
    own_labels: dict[str, str] = field(default_factory=dict)
    # The content of an event whose latest occurrence carries a label; unlabelled events are
    # kept by location only, so a run holds no more images than it writes.
    contents: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    labels: dict[str, list[LateLabel]] = field(default_factory=dict)
    predictions: dict[str, dict[str, Prediction]] = field(default_factory=dict)
    rejections: list[Rejection] = field(default_factory=list)
    read: Counter[str] = field(default_factory=Counter)

    def add_event(self, event: Mapping[str, Any], location: Location) -> None:
        """A decoded event (the stream's contract): remember where it is and its own label."""
        record_id = str(event["id"])
        self.events[record_id] = location
        self.contents.pop(record_id, None)
        label = event.get(self.label_field)
        if label is None:
            return
        if not isinstance(label, str) or not label:
            detail = f"{self.label_field}: expected a non-empty string, got {label!r:.60}"
            self.reject(record_id, "event", "bad_label", detail, location)
            return
        self.own_labels[record_id] = label
        self.contents[record_id] = event

    def add_label(self, value: Any, location: Location) -> None:
        """A late label, `{"id": ..., "label": ...}` as parsed JSON."""
        if not isinstance(value, dict):
            detail = f"expected a JSON object, got {type(value).__name__}"
            self.reject(None, "label", "not_object", detail, location)
            return
        record_id, label = value.get("id"), value.get("label")
        if not isinstance(record_id, str) or not record_id:
            self.reject(None, "label", "bad_id", f"id: got {record_id!r:.60}", location)
            return
        if not isinstance(label, str) or not label:
            detail = f"label: expected a non-empty string, got {label!r:.60}"
            self.reject(record_id, "label", "bad_label", detail, location)
            return
        self.labels.setdefault(record_id, []).append(LateLabel(record_id, label, location))

    def add_prediction(self, value: Any) -> None:
        """A prediction as `mmops serve` writes it; anything else is not one and is skipped."""
        if not isinstance(value, dict) or not isinstance(value.get("id"), str):
            return
        model = value.get("model") if isinstance(value.get("model"), dict) else {}
        label = value.get("label")
        if not isinstance(label, str):
            return
        found = Prediction(
            value["id"], label, str(model.get("name", "?")), str(model.get("version", "?"))
        )
        self.predictions.setdefault(found.id, {})[found.key] = found

    def reject(
        self,
        record_id: str | None,
        source: str,
        reason: str,
        detail: str,
        location: Location | None = None,
    ) -> None:
        self.rejections.append(Rejection(record_id, source, reason, detail, location))


@dataclass
class FeedbackState:
    """What a run hands to the next: where each seen event lies (so a later label can read it
    again), labels still waiting for their event, and predictions of seen events."""

    events: dict[str, Location] = field(default_factory=dict)
    labels: dict[str, list[LateLabel]] = field(default_factory=dict)
    predictions: dict[str, dict[str, Prediction]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "events": {k: asdict(v) for k, v in self.events.items()},
            "labels": {k: [asdict(x) for x in v] for k, v in self.labels.items()},
            "predictions": {
                k: [asdict(p) for p in v.values()] for k, v in self.predictions.items()
            },
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> FeedbackState:
        def late(item: Mapping[str, Any]) -> LateLabel:
            return LateLabel(item["id"], item["label"], Location(**item["location"]))

        return cls(
            events={k: Location(**v) for k, v in raw.get("events", {}).items()},
            labels={k: [late(x) for x in v] for k, v in raw.get("labels", {}).items()},
            predictions={
                k: {(p := Prediction(**x)).key: p for x in v}
                for k, v in raw.get("predictions", {}).items()
            },
        )

    def advance(
        self, collected: Collected, waiting: Mapping[str, list[LateLabel]], first: Mapping[Any, int]
    ) -> FeedbackState:
        """The state after a run: its events added, `waiting` labels kept, and events the topic
        no longer holds (offset before the partition's `first` offset) forgotten."""
        events = {**self.events, **collected.events}
        events = {
            k: loc
            for k, loc in events.items()
            if loc.offset >= first.get((loc.topic, loc.partition), 0)
        }
        predictions: dict[str, dict[str, Prediction]] = {}
        for source in (self.predictions, collected.predictions):
            for record_id, by_key in source.items():
                if record_id in events:
                    predictions.setdefault(record_id, {}).update(by_key)
        return FeedbackState(events, dict(waiting), predictions)


@dataclass(frozen=True)
class Joined:
    rows: list[LabelledEvent]
    rejections: list[Rejection]
    waiting: dict[str, list[LateLabel]]  # labels whose event no run has seen yet


def in_order(labels: Sequence[LateLabel]) -> list[LateLabel]:
    """Late labels of one id, first to last: by offset where they share a partition (a keyed
    producer puts them there), else by broker timestamp."""
    if len({(x.location.topic, x.location.partition) for x in labels}) <= 1:
        return sorted(labels, key=lambda x: x.location.offset)
    return sorted(labels, key=lambda x: (x.location.timestamp, x.location.offset))


def join_labels(collected: Collected, state: FeedbackState, classes: Iterable[str]) -> Joined:
    """The events to write with their final labels, the labels rejected, and those waiting.

    Candidates are the events read now with a label of their own, and any event (read now or
    in an earlier run) that a late label names. Labels apply in order: the event's own, then
    late labels from earlier runs, then this run's; one outside `classes` is rejected and the
    event keeps the label before it.
    """
    known = set(classes)
    rows: list[LabelledEvent] = []
    rejections: list[Rejection] = []
    waiting: dict[str, list[LateLabel]] = {}
    late = {
        i: [*state.labels.get(i, []), *in_order(collected.labels.get(i, []))]
        for i in {*state.labels, *collected.labels}
    }
    for record_id in sorted({*collected.own_labels, *late}):
        location = collected.events.get(record_id) or state.events.get(record_id)
        if location is None:
            waiting[record_id] = late[record_id]
            continue
        steps: list[tuple[str, str, Location | None]] = []
        if record_id in collected.own_labels:
            steps.append((collected.own_labels[record_id], "event", location))
        steps += [(x.label, "feedback", x.location) for x in late.get(record_id, [])]
        final: tuple[str, str] | None = None
        for label, source, where in steps:
            if label in known:
                final = (label, source)
            else:
                detail = f"label {label!r:.80} is not a class of the dataset ({shown(known)})"
                kind = "event" if source == "event" else "label"
                rejections.append(Rejection(record_id, kind, "unknown_label", detail, where))
        if final is not None:
            content = collected.contents.get(record_id)  # only for an event read now
            rows.append(LabelledEvent(record_id, final[0], final[1], location, content))
    return Joined(rows, rejections, waiting)


def shown(classes: Iterable[str]) -> str:
    names = sorted(classes)
    more = len(names) - MAX_CLASSES_SHOWN
    return ", ".join(names[:MAX_CLASSES_SHOWN]) + (f" and {more} more" if more > 0 else "")


def online_accuracy(
    rows: Iterable[LabelledEvent],
    *predictions: Mapping[str, Mapping[str, Prediction]],
) -> tuple[dict[str, dict[str, Any]], int]:
    """Accuracy of each model version on the labelled events it predicted, and how many
    labelled events had no prediction. An event predicted by two versions counts for both."""
    scores: dict[str, list[int]] = {}
    models: dict[str, Prediction] = {}
    unpredicted = 0
    for row in rows:
        found: dict[str, Prediction] = {}
        for source in predictions:
            found.update(source.get(row.id, {}))
        unpredicted += not found
        for key, prediction in found.items():
            models[key] = prediction
            hit = scores.setdefault(key, [0, 0])
            hit[0] += 1
            hit[1] += prediction.label == row.label
    accuracy = {
        key: {
            "model": models[key].model,
            "version": models[key].version,
            "events": n,
            "correct": correct,
            "accuracy": round(correct / n, 4),
        }
        for key, (n, correct) in sorted(scores.items())
    }
    return accuracy, unpredicted


IMAGE_SUFFIXES = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"))


def snapshot_record(
    event: Mapping[str, Any], label: str, split: str
) -> tuple[dict[str, Any], bytes | None]:
    """A labelled event as a manifest record (its image as a file path) and the image's bytes.

    Raises ValueError naming the field when the image is not base64. Bytes that are neither
    PNG nor JPEG keep a `.bin` name, so validation names the file and the event.
    """
    record_id = str(event["id"])
    image, data = None, None
    if event.get("image") is not None:
        try:
            data = base64.b64decode(event["image"], validate=True)
        except (binascii.Error, ValueError, TypeError) as error:
            raise ValueError(f"image: not base64 ({error})") from None
        suffix = next((s for magic, s in IMAGE_SUFFIXES if data.startswith(magic)), ".bin")
        image = f"images/{hashlib.sha256(record_id.encode()).hexdigest()[:24]}{suffix}"
    text = event.get("text")
    record: dict[str, Any] = {
        "id": record_id,
        "image": image,
        "text": text if isinstance(text, str) else None,
        "label": label,
        "split": split,
    }
    if isinstance(event.get("group"), str):
        record["group"] = event["group"]
    return record, data


def enough_rows(rows: int, min_rows: int) -> bool:
    """Whether a run writes a snapshot: at least feedback.min_rows labelled events."""
    return rows >= min_rows


@dataclass(frozen=True)
class MergedRow:
    record: dict[str, Any]
    source: str  # "base" or the snapshot's name
    image_from: str | None  # the image's path inside its source


@dataclass
class MergeStats:
    name: str
    rows: int = 0
    added: int = 0
    replaced: int = 0
    kept_split: list[str] = field(default_factory=list)  # ids that stayed in val or test


@dataclass(frozen=True)
class Merge:
    rows: list[MergedRow]
    base_rows: int
    snapshots: list[MergeStats]

    def sources(self) -> Counter[str]:
        return Counter(row.source for row in self.rows)


def merge_rows(
    base: Iterable[Mapping[str, Any]],
    snapshots: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
    split: str,
    image_prefix: str = "feedback",
) -> Merge:
    """The current rows (each with its split) plus the snapshots' rows, oldest snapshot first.

    A feedback row joins `split`; one whose id is already there replaces it (feedback wins)
    but keeps the split of a val or test row, so the held-out splits never lose a row. Its
    image goes under `image_prefix/<snapshot>/`.
    """
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {', '.join(SPLITS)}, got {split!r}")
    rows: dict[str, MergedRow] = {}
    for record in base:
        rows[str(record["id"])] = MergedRow(dict(record), "base", record.get("image"))
    base_rows = len(rows)
    stats = []
    for name, records in snapshots:
        done = MergeStats(name, rows=len(records))
        for record in records:
            record_id = str(record["id"])
            new = {**record, "split": split}
            old = rows.get(record_id)
            if old is None:
                done.added += 1
            else:
                done.replaced += 1
                if old.record.get("split") in HELD_OUT and old.record["split"] != split:
                    new["split"] = old.record["split"]
                    done.kept_split.append(record_id)
            image = record.get("image")
            if image is not None:
                new["image"] = f"{image_prefix}/{name}/{image}"
            rows[record_id] = MergedRow(new, name, image)
        stats.append(done)
    return Merge(list(rows.values()), base_rows, stats)
