"""Commands of live serving: the local stack, topics, the consumer and the replay demo."""

from __future__ import annotations

import json
import logging
import os
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
from mmops.config import Params


def kafka_client_settings(quiet: bool = False) -> dict[str, Any]:
    from mmops.stream.settings import kafka_settings

    if quiet and not logging.getLogger().isEnabledFor(logging.DEBUG):
        # kafka-python logs each failed bootstrap try; the error line says it once, with a hint.
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        return kafka_settings()
    except ValueError as exc:
        raise UserError(str(exc), "see the KAFKA_* variables in README.md") from None


def stream_topics(params: Params) -> list[str]:
    """Every topic the platform reads or writes: events, predictions, dead letters, drift
    events and late labels."""
    cfg = params.stream
    names = [cfg.input_topic, cfg.output_topic, cfg.dead_letter_topic]
    return [*names, params.drift.topic, params.feedback.topic]


@command()
def serve(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="pin a model (models:/NAME/VERSION, runs:/ or a folder); an @alias is followed. "
            "Default: models:/<tracking.registered_model>@champion, followed",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus port (default: stream.metrics_port; 0 = off)")
    ] = None,
    log_format: Annotated[str, typer.Option(help="json (one object per line) | text")] = "json",
    max_events: Annotated[
        int | None, typer.Option(help="stop after this many events (default: run until signalled)")
    ] = None,
    params_file: ParamsOption = None,
    overrides: SetOption = None,
) -> None:
    """Serve live predictions from Kafka: micro-batches, at least once, bad events to the DLQ.

    Brokers and credentials come from KAFKA_BOOTSTRAP_SERVERS (default 127.0.0.1:9092),
    KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD and
    KAFKA_SSL_CAFILE/CERTFILE/KEYFILE; the registry from MLFLOW_TRACKING_URI. SIGTERM or Ctrl-C
    finishes the batch in hand, commits it and exits. Run N of these over N partitions to scale.
    """
    from mmops.serving.logs import JsonLogFormatter
    from mmops.stream.server import StreamServer

    params = load_command_params(params_file, overrides)
    if log_format not in ("json", "text"):
        raise UserError(f"--log-format {log_format!r}", "--log-format takes json or text")
    kafka = kafka_client_settings()
    if log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())
    from mmops_flows.trigger import drift_trigger

    server = StreamServer(params, model, kafka, on_alarm=drift_trigger(params.trigger))
    port = params.stream.metrics_port if metrics_port is None else metrics_port
    if port:
        server.metrics.serve(port, server.liveness)
    typer.echo(json.dumps(_run_server(server, max_events).to_dict()))


def _run_server(server: Any, max_events: int | None) -> Any:
    """Run until signalled (SIGTERM or Ctrl-C finish the batch in hand); its stats."""
    import signal

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.stop())
    try:
        return server.run(max_events)
    except Exception as exc:
        from mlflow.exceptions import MlflowException

        if not isinstance(exc, MlflowException | FileNotFoundError):
            raise
        raise UserError(
            f"cannot load {server.models.model_ref}: {str(exc).strip().splitlines()[0]}",
            "`mmops retrain` registers and promotes a champion; --model pins another model",
            1,
        ) from None
    finally:
        server.metrics.close()


@command()
def up(
    mlflow_port: Annotated[int, typer.Option(help="MLflow server port")] = 5000,
    with_mlflow: Annotated[
        bool, typer.Option("--mlflow/--no-mlflow", help="also serve the MLflow UI")
    ] = True,
    params_file: ParamsOption = None,
    overrides: SetOption = None,
) -> None:
    """Start the local stack on loopback: Kafka-compatible broker with the topics, MLflow server."""
    from mmops.environment import tracking_uri
    from mmops.local.stack import DEFAULT_BOOTSTRAP
    from mmops.local.stack import up as start
    from mmops.stream.settings import topic_configs

    params = load_command_params(params_file, overrides)
    cfg = params.stream
    services = start(
        stream_topics(params),
        cfg.partitions,
        os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or DEFAULT_BOOTSTRAP,
        tracking_uri(),
        mlflow_port,
        with_mlflow,
        configs=topic_configs(cfg),
    )
    for service in services:
        say(f"{service.name:7} {service.url:24} pid {service.pid}  log {service.log}")
    say(
        f"topics  {', '.join(stream_topics(params))} "
        f"({cfg.partitions} partitions); `mmops down` stops the stack"
    )


@command()
def down() -> None:
    """Stop the local stack that `mmops up` started (broker topics live in memory: gone)."""
    from mmops.local.stack import down as stop

    stopped = stop()
    say(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@command("stream-demo")
def stream_demo(
    data: Annotated[Path, typer.Option("--data", help="dataset directory to send")],
    split: Annotated[str, typer.Option(help="which split to send")] = "test",
    limit: Annotated[int | None, typer.Option(help="send at most this many events")] = None,
    rate: Annotated[
        float, typer.Option(help="events per second, like a live source (0: all at once)")
    ] = 50.0,
    timeout: Annotated[float, typer.Option(help="seconds to wait for every answer")] = 120.0,
    quiet: Annotated[bool, typer.Option("--quiet", help="no line per prediction")] = False,
    shift: Annotated[
        str,
        typer.Option(
            help="change the stream part-way: none | image (decoloured) | invert (inverted "
            "images) | text (another vocabulary) | mixture (1 event in 10 of another "
            "vocabulary) | label (one class 70%)"
        ),
    ] = "none",
    shift_at: Annotated[
        int, typer.Option(help="--shift: events sent before it starts", min=0)
    ] = 1000,
    events_total: Annotated[
        int | None,
        typer.Option(
            "--events",
            help="--shift: events to send, drawn from the split (default: shift-at + 2000)",
        ),
    ] = None,
    labelled: Annotated[
        bool, typer.Option("--labelled", help="events carry their label (feedback.label_field)")
    ] = False,
    report: Annotated[
        Path | None, typer.Option(help="write the summary JSON here (for `mmops summary`)")
    ] = None,
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send a dataset split as events to a running `mmops serve`; print predictions as they come."""
    from mmops.data.dataset import load_splits, split_rows
    from mmops.stream.replay import dataset_events, replay

    params = load_command_params(params_file, overrides)
    rows = split_rows(load_splits(data, params), split, data).to_dict("records")[:limit]
    events = _demo_events(dataset_events(rows, data), params, shift, shift_at, events_total)
    if labelled:
        for event in events:
            event[params.feedback.label_field] = event.get("truth")

    kafka = kafka_client_settings(quiet=True)
    say(
        f"sending {len(events)} {split} events to {params.stream.input_topic} on "
        f"{','.join(kafka['bootstrap_servers'])}" + (f" at {rate:g}/s" if rate else "")
    )
    show = None if quiet else _show_result
    try:
        summary = replay(events, params.stream, kafka, timeout, show, rate=rate or None)
    except RuntimeError as exc:  # a missing topic, an undelivered event
        raise UserError(str(exc), "`mmops up` or `mmops topics` creates the topics", 1) from None
    _report_demo(summary, report, as_json, timeout)


def _demo_events(
    events: list[dict[str, Any]], params: Params, shift: str, at: int, total: int | None
) -> list[dict[str, Any]]:
    """The demo's events, shifted from event `at` on when `shift` is not none."""
    if shift == "none":
        return events
    from mmops.monitoring.shifts import SHIFTS, shifted_stream

    total = total or at + 2000
    try:
        events = shifted_stream(events, shift, at, total, seed=params.drift.seed)
    except ValueError as exc:
        raise UserError(str(exc), f"--shift takes {', '.join(SHIFTS)}") from None
    say(f"--shift {shift}: events {at + 1}..{total} are shifted")
    return events


def _report_demo(
    summary: dict[str, Any], report: Path | None, as_json: bool, timeout: float
) -> None:
    say(
        f"{summary['predicted']}/{summary['sent']} predicted, {summary['dead_letters']} dead "
        f"letters, {summary['missing']} missing; accuracy {summary.get('accuracy', '-')}; "
        f"latency p50 {summary.get('latency_ms_p50', 0):.0f} ms, "
        f"p99 {summary.get('latency_ms_p99', 0):.0f} ms; {summary['versions']}"
    )
    if report is not None:
        write_json(report, summary)
    if as_json:
        typer.echo(json.dumps(summary))
    if summary["missing"]:
        raise UserError(
            f"{summary['missing']} of {summary['sent']} events got no answer in {timeout:g}s",
            "is `mmops serve` running (its log says `partitions assigned`)? else raise --timeout",
            1,
        )


@command()
def topics(
    partitions: Annotated[
        int | None,
        typer.Option(min=1, help="partitions of a topic created now (default: stream.partitions)"),
    ] = None,
    wait: Annotated[
        float, typer.Option(min=0, help="seconds to wait for a broker that is still starting")
    ] = 60.0,
    params_file: ParamsOption = None,
    overrides: SetOption = None,
) -> None:
    """Create the stream's topics (events, predictions, dead letters, drift, feedback) where
    missing; report them all.

    The one-shot init of docker-compose and Kubernetes: brokers and credentials come from the
    KAFKA_* variables, as for `mmops serve`. Existing topics are left as they are; new ones take
    records as large as stream.max_event_bytes.
    """
    from mmops.local.stack import create_topics
    from mmops.stream.settings import topic_configs

    params = load_command_params(params_file, overrides)
    cfg = params.stream
    kafka = kafka_client_settings(quiet=True)
    servers = kafka.pop("bootstrap_servers")
    names = stream_topics(params)
    created = create_topics(
        servers, names, partitions or cfg.partitions, wait, topic_configs(cfg), **kafka
    )
    for topic in created:
        state = "created" if topic.created else "exists"
        say(f"{topic.name:<24} {state:<8} {topic.partitions} partitions")


def _show_result(result: dict) -> None:
    """One line per answer of `stream-demo`: the prediction and its latency, or the dead letter."""
    if "error" in result:
        say(f"{result['id']:>12}  dead letter: {result['error']}")
        return
    truth = result.get("truth")
    mark = "" if truth in (None, result["label"]) else f"  (truth {truth})"
    latency = result["arrived_ms"] - result["event_ts"]
    say(
        f"{result['id']:>12}  {result['label']:<10} {max(result['scores'].values()):.3f}  "
        f"v{result['model']['version']}  {latency:>5} ms{mark}"
    )
