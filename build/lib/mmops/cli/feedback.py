"""`mmops feedback`: labelled events from the stream into a validated, versioned data version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from mmops.cli.common import (
    JsonOption,
    ParamsOption,
    SetOption,
    UserError,
    command,
    load_command_params,
    say,
    write_json,
)
from mmops.cli.stream import kafka_client_settings

TimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--timeout-s",
        min=0.1,
        help="stop once nothing new arrives for this long (default: feedback.timeout_s)",
    ),
]
MaxEventsOption = Annotated[
    int | None,
    typer.Option("--max-events", min=1, help="stop after this many records of the three topics"),
]
GroupOption = Annotated[
    str, typer.Option("--group", help="the consumer group whose committed offsets say what is new")
]
NoDvcOption = Annotated[
    bool, typer.Option("--no-dvc", help="write and merge without versioning with DVC")
]
ReportOption = Annotated[Path | None, typer.Option(help="write the summary JSON here")]


@command()
def feedback(
    timeout_s: TimeoutOption = None,
    max_events: MaxEventsOption = None,
    group: GroupOption = "mmops-feedback",
    no_dvc: NoDvcOption = False,
    report: ReportOption = None,
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Join labels from the stream to their events and predictions; write the labelled events
    as a new dataset snapshot, validate it, merge it into feedback.merged_dir, version both.

    Reads the input, feedback and prediction topics from the group's committed offsets and
    commits only after the snapshot is written and versioned. Fewer labelled events than
    feedback.min_rows: no snapshot, exit 0.
    """
    from mmops.data.snapshot import FeedbackError, FeedbackRejected
    from mmops.stream.feedback import collect_feedback

    params = load_command_params(params_file, overrides)
    kafka = kafka_client_settings(quiet=True)
    try:
        result = collect_feedback(
            params,
            kafka,
            timeout_s=timeout_s,
            max_records=max_events,
            group_id=group,
            dvc=not no_dvc,
        )
    except FeedbackRejected as exc:
        raise UserError(
            str(exc),
            "nothing was merged or committed; fix the producer of the events named, or skip "
            "them by moving the group's offsets past them, then run again",
            1,
        ) from None
    except FeedbackError as exc:
        raise UserError(str(exc), "see `mmops feedback --help`", 1) from None
    summary = result.to_dict()
    for line in describe(summary, params.feedback.min_rows):
        say(line)
    if report is not None:
        write_json(report, summary)
    if as_json:
        typer.echo(json.dumps(summary))


def describe(summary: dict[str, Any], min_rows: int) -> list[str]:
    """The run in a few lines for a person."""
    if not summary["read"]:
        return [summary["message"]]
    read = ", ".join(f"{n} from {topic}" for topic, n in summary["read"].items())
    sources = summary["label_from"]
    lines = [
        f"read {read}",
        f"labelled {summary['rows']} events ({sources.get('event', 0)} with their own label, "
        f"{sources.get('feedback', 0)} from late labels); {summary['unlabelled']} events "
        f"without a label and {summary['waiting']} labels without an event wait for each other",
    ]
    if summary["rejected"]:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(summary["rejected"].items()))
        lines.append(f"rejected {sum(summary['rejected'].values())}: {reasons}")
        lines += [
            f"  {r['source']} {r['id']}: {r['reason']}: {r['detail']}"
            for r in summary["rejections"][:10]
        ]
    for key, figures in summary["accuracy"].items():
        lines.append(
            f"online accuracy {key}: {figures['accuracy']:.3f} "
            f"({figures['correct']}/{figures['events']} labelled events)"
        )
    if summary["unpredicted"]:
        lines.append(f"{summary['unpredicted']} labelled events had no prediction")
    if summary["snapshot"] is None:
        lines.append(summary["message"])
        return lines
    merged = summary["merged"]
    kept = f"; {len(merged['kept_split'])} stayed in val/test" if merged["kept_split"] else ""
    lines.append(f"snapshot {summary['snapshot']}: {summary['rows']} rows, validated")
    origins = {merged["base"] if s == "base" else s: n for s, n in merged["sources"].items()}
    lines.append(
        f"merged {merged['path']}: {merged['rows']} rows "
        f"({', '.join(f'{n} from {s}' for s, n in origins.items())}; "
        f"{merged['replaced']} replaced{kept}), validated"
    )
    if summary["versions"]:
        lines += [f"dvc: {path} {md5}" for path, md5 in summary["versions"].items()]
        files = " ".join(summary["dvc_files"])
        lines.append(f"offsets committed; record the versions: git add {files} && git commit")
    else:
        lines.append("offsets committed; not versioned (--no-dvc)")
    return lines
