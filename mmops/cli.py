"""The `mmops` command line: one thin command per pipeline stage."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from mmops.config import ConfigError, Params, resolve_params

DATASET_HINT = (
    "a dataset is a directory with one manifest (manifest.jsonl, .csv or .parquet) and the "
    "images it names; `mmops demo-data DIR` writes one"
)
MODEL_HINT = (
    "a model is a folder, runs:/<run_id>/model, models:/<name>/<version> or "
    "models:/<name>@<alias>; `mmops models` lists the registered versions and aliases"
)
BROKER_HINT = (
    "`mmops up` starts a local broker; otherwise point KAFKA_BOOTSTRAP_SERVERS at a running one"
)


class UserError(Exception):
    """A mistake the user can fix: shown as an `error:` and a `hint:` line, without a traceback."""

    def __init__(self, message: str, hint: str, code: int = 2) -> None:
        super().__init__(message)
        self.hint, self.code = hint, code


def _raised(exc: BaseException, *classes: str) -> bool:
    """Whether `exc` is an instance of one of `classes`, given as dotted names."""
    for dotted in classes:
        module, _, name = dotted.rpartition(".")
        # A class of a module never imported cannot have been raised, and importing mlflow or
        # pandas just to check would add seconds to every error.
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def explain(exc: Exception, params: dict[str, Any]) -> UserError | None:
    """The user's mistake behind `exc`, given the command's parameters; None for a bug."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, ConfigError):
        return UserError(
            str(exc), "params.yaml lists every key with its default; --set takes section.key=value"
        )
    if _raised(exc, "mmops.dataset.DatasetError"):
        return UserError(str(exc), DATASET_HINT)
    if _raised(exc, "mmops.registry.RegistryError"):
        return UserError(
            str(exc), "`mmops models` lists the registered versions; `mmops retrain` adds one"
        )
    if _raised(exc, "mmops.stack.BrokerUnavailable", "kafka.errors.KafkaError"):
        return UserError(str(exc), BROKER_HINT, code=1)
    if _raised(exc, "mmops.stack.StackError"):
        return UserError(str(exc), "`mmops down` stops what did start; logs are in .mmops/logs", 1)
    if isinstance(exc, FileExistsError):
        return UserError(str(exc), "give a new or empty directory")
    if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError):
        message = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
        return UserError(message, f"check the path; relative paths start at {Path.cwd()}")
    # No such model, version, run or alias, or a malformed models:/ URI.
    missing = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
    if (
        _raised(exc, "mlflow.exceptions.MlflowException")
        and getattr(exc, "error_code", "") in missing
    ):
        message = str(exc).strip().splitlines()[0]
        ref = params.get("model")
        return UserError(f"model {ref}: {message}" if ref else message, MODEL_HINT)
    return None


class ReportingCommand(TyperCommand):
    """A command whose user mistakes print as one `error:` line and one `hint:` line.

    `mmops -v` or MMOPS_DEBUG=1 raises them instead, with the traceback.
    """

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            error = explain(exc, ctx.params)
            debug = os.environ.get("MMOPS_DEBUG", "") not in ("", "0")
            if error is None or debug or ctx.find_root().params.get("verbose"):
                raise
            typer.echo(f"error: {error}", err=True)
            typer.echo(f"hint: {error.hint}", err=True)
            raise typer.Exit(error.code) from None


HELP = (
    "mmops: multimodal (image + text) MLOps. Validate a dataset, train, evaluate, export to INT8, "
    "register and promote in MLflow, serve predictions from Kafka. Commands read ./params.yaml "
    "(--params FILE) and take --set section.key=value; `mmops COMMAND --help` tells more."
)
app = typer.Typer(no_args_is_help=True, add_completion=False, help=HELP)
command = partial(app.command, cls=ReportingCommand)

ParamsOption = Annotated[
    Path | None,
    typer.Option("--params", help="params file (default: ./params.yaml if present, else defaults)"),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a params key for this run, e.g. --set validate.workers=1"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")]
MetricsOption = Annotated[
    Path | None, typer.Option("--metrics", help="write metrics JSON here (for dvc metrics)")
]


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="debug logging; errors with their traceback")
    ] = False,
) -> None:
    """mmops: versioned, validated multimodal data to tracked models and streaming predictions."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # GX logs its own start-up at INFO; only its warnings concern a user.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    # kafka-python narrates every connection at INFO, and httpx every call to Prefect's API.
    for chatty in ("kafka", "httpx"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _params(path: Path | None, overrides: list[str] | None) -> Params:
    return resolve_params(path, overrides or [])


def _kafka(quiet: bool = False) -> dict[str, Any]:
    from mmops.stream import kafka_settings

    if quiet and not logging.getLogger().isEnabledFor(logging.DEBUG):
        # kafka-python logs each failed bootstrap try; the error line says it once, with a hint.
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        return kafka_settings()
    except ValueError as exc:
        raise UserError(str(exc), "see the KAFKA_* variables in README.md") from None


@command("demo-data")
def demo_data(
    out_dir: Annotated[Path, typer.Argument(help="directory to write the dataset to")],
    n: Annotated[int | None, typer.Option(help="examples (default: demo_data.n)")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (default: demo_data.seed)")] = None,
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write the deterministic synthetic image + text dataset."""
    from mmops.demo_data import make_demo_data

    cfg = _params(params_file, overrides).demo_data
    n, seed = n if n is not None else cfg.n, seed if seed is not None else cfg.seed
    start = time.perf_counter()
    manifest = make_demo_data(out_dir, n=n, seed=seed, image_size=cfg.image_size)
    seconds = round(time.perf_counter() - start, 2)
    typer.echo(f"wrote {n} examples to {manifest} in {seconds}s")
    if as_json:
        typer.echo(
            json.dumps({"manifest": str(manifest), "n": n, "seed": seed, "seconds": seconds})
        )


@command()
def validate(
    data_dir: Annotated[Path, typer.Argument(help="dataset directory")],
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    out: Annotated[
        Path | None, typer.Option(help="write validation.json, gx_result.json, report.html")
    ] = None,
    metrics: MetricsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check a dataset; exit 0 when it is fit to train on, 1 when not."""
    from mmops.validate import validate_dataset, write_report

    params = _params(params_file, overrides)
    start = time.perf_counter()
    report = validate_dataset(data_dir, params)
    seconds = round(time.perf_counter() - start, 2)
    for check in report.failed:
        typer.echo(f"FAIL {check.name}: {check.summary()}")
    if out is not None:
        typer.echo(f"report: {write_report(report, out)}")
    if metrics is not None:
        _write_json(metrics, report.metrics())
    verdict = (
        "fit to train on"
        if report.success
        else f"NOT fit to train on ({len(report.failed)} checks failed)"
    )
    rows = report.stats.get("rows", 0)
    typer.echo(f"{data_dir}: {rows} rows, {len(report.checks)} checks, {verdict} [{seconds}s]")
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    raise typer.Exit(0 if report.success else 1)


@command("data-version")
def data_version_cmd(
    data_dir: Annotated[Path, typer.Argument(help="dataset directory")],
    as_json: JsonOption = False,
) -> None:
    """Print the DVC content hash and git commit of a dataset."""
    from mmops.versioning import data_version

    version = data_version(data_dir)
    state = "matches DVC's record" if version.tracked else f"DVC records {version.dvc_md5}"
    typer.echo(
        f"{data_dir}: md5 {version.md5} ({version.nfiles} files), {state}, "
        f"git {version.git_commit}{' (dirty)' if version.git_dirty else ''}"
    )
    if as_json:
        typer.echo(json.dumps(version.to_dict()))


@command()
def train(
    data: Annotated[Path, typer.Option("--data", help="dataset directory")],
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default: train.out_dir)")] = None,
    resume: Annotated[
        bool, typer.Option(help="continue from the checkpoint in the output folder")
    ] = False,
    metrics: MetricsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train a model on the dataset's train split, tracked in MLflow."""
    import shutil

    from mmops.tracking import tracked_train

    params = _params(params_file, overrides)
    out_dir = out or Path(params.train.out_dir)
    if int(os.environ.get("RANK", "0")) > 0:
        # Under torchrun the other processes train their shards; rank 0 alone clears the
        # folder, tracks the run in MLflow, saves and logs the model and reports.
        from mmops.train import train as train_shard

        train_shard(data, params, out_dir, resume=resume, progress=False)
        return
    if not resume and out_dir.exists():
        shutil.rmtree(out_dir)  # a stale checkpoint must not leak into a fresh run
    run = tracked_train(data, params, out_dir, resume=resume)
    summary = {
        "run_id": run.run_id,
        "model_uri": run.model_uri,
        "model_dir": str(run.model_dir),
        "best_val_accuracy": run.result["best_val_accuracy"],
        "best_epoch": run.result["best_epoch"],
        "epochs_run": run.result["epochs_run"],
        "parameters": run.result["parameters"],
        "device": run.result["device"],
    }
    if metrics is not None:
        _write_json(metrics, summary)
    typer.echo(
        f"trained: best val accuracy {summary['best_val_accuracy']:.4f} at epoch "
        f"{summary['best_epoch']}; run {run.run_id}; model {run.model_uri}"
    )
    if as_json:
        typer.echo(json.dumps(summary))


@command()
def evaluate(
    data: Annotated[Path, typer.Option("--data", help="dataset directory")],
    model: Annotated[str, typer.Option("--model", help="model folder, runs:/ or models:/ URI")],
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    out: Annotated[
        Path | None, typer.Option(help="report folder (default: evaluate.out_dir)")
    ] = None,
    metrics: MetricsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Evaluate a model on the test split; log the report to its MLflow run."""
    from mmops.evaluate import flat_metrics
    from mmops.tracking import tracked_evaluate

    params = _params(params_file, overrides)
    results, run_id = tracked_evaluate(model, data, params, out)
    flat = flat_metrics(results)
    if metrics is not None:
        _write_json(metrics, flat)
    ablation = results["ablation"]
    typer.echo(
        f"test accuracy {results['accuracy']:.4f}, macro-F1 {results['macro_f1']:.4f}; "
        f"image only {ablation['image_only']:.4f}, text only {ablation['text_only']:.4f}; "
        f"run {run_id}"
    )
    if as_json:
        typer.echo(json.dumps({"run_id": run_id, **flat}))


@command()
def export(
    data: Annotated[Path, typer.Option("--data", help="dataset directory (its test split)")],
    model: Annotated[str, typer.Option("--model", help="model folder, runs:/ or models:/ URI")],
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    out: Annotated[
        Path | None, typer.Option(help="export folder (default: export.out_dir)")
    ] = None,
    metrics: MetricsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export to ONNX, quantize to INT8, gate INT8 against the torch model; log to MLflow."""
    from mmops.tracking import export_metrics, tracked_export

    params = _params(params_file, overrides)
    report, run_id, model_uri = tracked_export(model, data, params, out)
    flat = export_metrics(report)
    if metrics is not None:
        _write_json(metrics, flat)
    int8 = report["gates"]["int8"]
    verdict = "passed" if int8["passed"] else "rejected: " + "; ".join(int8["reasons"])
    typer.echo(
        f"exported: serving {report['serving']}; INT8 gate {verdict}; INT8 size "
        f"{report['size_ratio_int8_vs_fp32']:.2f}x FP32; run {run_id}; model {model_uri}"
    )
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "run_id": run_id,
                    "model_uri": model_uri,
                    "serving": report["serving"],
                    "int8_passed": int8["passed"],
                    "int8_reasons": int8["reasons"],
                    **flat,
                }
            )
        )


@command()
def predict(
    model: Annotated[str, typer.Option("--model", help="model folder, runs:/ or models:/ URI")],
    out: Annotated[Path, typer.Option("--out", help="JSONL file to write predictions to")],
    records: Annotated[
        Path | None,
        typer.Option("--input", help="JSONL records: id, text, image (base64 or a path)"),
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="a dataset directory instead of --input")
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="with --data: only this split (train, val, test)")
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="auto | int8 | fp32 | torch (default: predict.backend)")
    ] = None,
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Predict a file of records or a dataset; bad records get an error line, not a crash."""
    from mmops.predict import Predictor, predict_to_file, read_records

    params = _params(params_file, overrides)
    if (records is None) == (data is None):
        raise UserError(
            "give exactly one of --input and --data",
            "--input FILE.jsonl predicts records; --data DIR [--split S] predicts a dataset",
        )
    predictor = Predictor.load(model, backend or params.predict.backend, params.predict)
    if data is not None:
        from mmops.train import load_splits

        frame = load_splits(data, params)
        if split is not None:
            frame = frame[frame["split"] == split]
        rows = frame[["id", "image", "text"]].to_dict("records")
        summary = predict_to_file(predictor, rows, out, root=data)
    else:
        assert records is not None
        try:
            # Image paths in a records file are relative to the file.
            summary = predict_to_file(predictor, read_records(records), out, root=records.parent)
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{records}: not text ({exc.reason} at byte {exc.start})",
                "--input takes JSONL: one JSON object per line, UTF-8",
            ) from None
    typer.echo(
        f"predicted {summary['records']} records ({summary['errors']} errors) with "
        f"{summary['model']} v{summary['version']} on {summary['backend']}: {out}"
    )
    if as_json:
        typer.echo(json.dumps(summary))


@command()
def retrain(
    data: Annotated[Path | None, typer.Option("--data", help="dataset (default: data.dir)")] = None,
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    out: Annotated[
        Path | None, typer.Option(help="run folder (default: runs/<UTC timestamp>)")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Run the Prefect flow: validate, train, evaluate, export, register, gate, promote."""
    import os

    # Without PREFECT_API_URL the flow starts a temporary local API; its first start creates
    # the database, which takes longer than Prefect's default 20 s wait on a small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from flows.retrain import retrain_and_evaluate
    from mmops.retrain import DatasetRejected

    params = _params(params_file, overrides)
    data_dir = str(data or params.data.dir)
    try:
        result = retrain_and_evaluate(
            data_dir=data_dir,
            params_file=str(params_file) if params_file else None,
            overrides=list(overrides or []),
            out_dir=str(out) if out else None,
        )
    except DatasetRejected as exc:
        typer.echo(f"error: {exc}; nothing trained, registry untouched", err=True)
        if as_json:
            typer.echo(json.dumps({"promoted": False, "error": str(exc)}))
        raise typer.Exit(1) from None
    gate = result["gate"]
    typer.echo(
        f"{result['model']} v{result['version']}: accuracy {result['accuracy']:.4f}; gate "
        + ("passed" if gate["passed"] else "rejected (" + "; ".join(gate["reasons"]) + ")")
        + f"; {'promoted' if result['promoted'] else 'not promoted'}; "
        f"champion {'v' + result['champion'] if result['champion'] else 'none'}"
    )
    if as_json:
        typer.echo(json.dumps(result))


@command()
def promote(
    version: Annotated[str, typer.Argument(help="model version to make champion")],
    reason: Annotated[str, typer.Option("--reason", help="why, recorded on the version")],
    params_file: ParamsOption = None,
    overrides: SetOption = None,
) -> None:
    """Move the champion alias to VERSION by hand (no gate), recording who, when and why."""
    from mmops.registry import promote as promote_version

    name = _params(params_file, overrides).tracking.registered_model
    promote_version(name, version, reason)
    typer.echo(f"{name}: champion is v{version}")


@command()
def rollback(
    reason: Annotated[str, typer.Option("--reason", help="why")] = "rollback",
    params_file: ParamsOption = None,
    overrides: SetOption = None,
) -> None:
    """Move the champion alias back to the previous champion."""
    from mmops.registry import rollback as rollback_champion

    name = _params(params_file, overrides).tracking.registered_model
    version = rollback_champion(name, reason)
    typer.echo(f"{name}: champion is back to v{version}")


@command()
def models(
    params_file: ParamsOption = None, overrides: SetOption = None, as_json: JsonOption = False
) -> None:
    """List the registered versions with their aliases and key metrics."""
    from mmops.registry import list_versions

    name = _params(params_file, overrides).tracking.registered_model
    versions = list_versions(name)
    if not versions:
        from mmops.tracking import tracking_uri

        typer.echo(f"{name}: no registered versions in {tracking_uri()} (`mmops retrain` adds one)")
    for v in versions:
        tags = v["tags"]
        typer.echo(
            f"v{v['version']:<4} {','.join(v['aliases']) or '-':<22} "
            f"accuracy {tags.get('test.accuracy', '?')[:6]}  gate "
            f"{tags.get('mmops.gate.passed', '?'):<5} data {tags.get('data.md5', '?')[:12]}  "
            f"run {v['run_id']}"
        )
    if as_json:
        typer.echo(json.dumps({"model": name, "versions": versions}))


@command()
def schedule(
    data: Annotated[Path | None, typer.Option("--data", help="dataset (default: data.dir)")] = None,
    params_file: ParamsOption = None,
    overrides: SetOption = None,
) -> None:
    """Serve the retrain flow as a Prefect deployment on the cron schedule in params.yaml."""
    from prefect.schedules import Cron

    from flows.retrain import retrain_and_evaluate

    params = _params(params_file, overrides)
    cfg = params.schedule
    typer.echo(f"serving deployment {cfg.name!r}: cron {cfg.cron!r} ({cfg.timezone}); Ctrl-C stops")
    retrain_and_evaluate.serve(
        name=cfg.name,
        schedule=Cron(cfg.cron, timezone=cfg.timezone),
        parameters={
            "data_dir": str(data or params.data.dir),
            "params_file": str(params_file) if params_file else None,
            "overrides": list(overrides or []),
        },
        pause_on_shutdown=False,
    )


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
    import signal

    from mmops.stream import JsonLogFormatter, StreamServer

    params = _params(params_file, overrides)
    if log_format not in ("json", "text"):
        raise UserError(f"--log-format {log_format!r}", "--log-format takes json or text")
    kafka = _kafka()
    if log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())
    server = StreamServer(params, model, kafka)
    port = params.stream.metrics_port if metrics_port is None else metrics_port
    if port:
        server.metrics.serve(port)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.stop())
    try:
        stats = server.run(max_events)
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
    typer.echo(json.dumps(stats.to_dict()))


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
    from mmops.stack import DEFAULT_BOOTSTRAP
    from mmops.stack import up as start
    from mmops.stream import topic_configs
    from mmops.tracking import tracking_uri

    cfg = _params(params_file, overrides).stream
    services = start(
        [cfg.input_topic, cfg.output_topic, cfg.dead_letter_topic],
        cfg.partitions,
        os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or DEFAULT_BOOTSTRAP,
        tracking_uri(),
        mlflow_port,
        with_mlflow,
        configs=topic_configs(cfg),
    )
    for service in services:
        typer.echo(f"{service.name:7} {service.url:24} pid {service.pid}  log {service.log}")
    typer.echo(
        f"topics  {cfg.input_topic}, {cfg.output_topic}, {cfg.dead_letter_topic} "
        f"({cfg.partitions} partitions); `mmops down` stops the stack"
    )


@command()
def down() -> None:
    """Stop the local stack that `mmops up` started (broker topics live in memory: gone)."""
    from mmops.stack import down as stop

    stopped = stop()
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


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
    report: Annotated[
        Path | None, typer.Option(help="write the summary JSON here (for `mmops summary`)")
    ] = None,
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send a dataset split as events to a running `mmops serve`; print predictions as they come."""
    from mmops.stream import dataset_events, replay
    from mmops.train import load_splits

    params = _params(params_file, overrides)
    frame = load_splits(data, params)
    rows = frame[frame["split"] == split].to_dict("records")[:limit]
    events = dataset_events(rows, data)

    def show(result: dict) -> None:
        if "error" in result:
            typer.echo(f"{result['id']:>12}  dead letter: {result['error']}")
            return
        truth = result.get("truth")
        mark = "" if truth in (None, result["label"]) else f"  (truth {truth})"
        latency = result["arrived_ms"] - result["event_ts"]
        typer.echo(
            f"{result['id']:>12}  {result['label']:<10} {max(result['scores'].values()):.3f}  "
            f"v{result['model']['version']}  {latency:>5} ms{mark}"
        )

    kafka = _kafka(quiet=True)
    typer.echo(
        f"sending {len(events)} {split} events to {params.stream.input_topic} on "
        f"{','.join(kafka['bootstrap_servers'])}" + (f" at {rate:g}/s" if rate else "")
    )
    try:
        summary = replay(
            events, params.stream, kafka, timeout, None if quiet else show, rate=rate or None
        )
    except RuntimeError as exc:  # a missing topic, an undelivered event
        raise UserError(str(exc), "`mmops up` or `mmops topics` creates the topics", 1) from None
    typer.echo(
        f"{summary['predicted']}/{summary['sent']} predicted, {summary['dead_letters']} dead "
        f"letters, {summary['missing']} missing; accuracy {summary.get('accuracy', '-')}; "
        f"latency p50 {summary.get('latency_ms_p50', 0):.0f} ms, "
        f"p99 {summary.get('latency_ms_p99', 0):.0f} ms; {summary['versions']}"
    )
    if report is not None:
        _write_json(report, summary)
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
    """Create the stream's input, output and dead-letter topics where missing; report them all.

    The one-shot init of docker-compose and Kubernetes: brokers and credentials come from the
    KAFKA_* variables, as for `mmops serve`. Existing topics are left as they are; new ones take
    records as large as stream.max_event_bytes.
    """
    from mmops.stack import create_topics
    from mmops.stream import topic_configs

    cfg = _params(params_file, overrides).stream
    kafka = _kafka(quiet=True)
    servers = kafka.pop("bootstrap_servers")
    names = [cfg.input_topic, cfg.output_topic, cfg.dead_letter_topic]
    created = create_topics(
        servers, names, partitions or cfg.partitions, wait, topic_configs(cfg), **kafka
    )
    for topic in created:
        state = "created" if topic.created else "exists"
        typer.echo(f"{topic.name:<24} {state:<8} {topic.partitions} partitions")


@command()
def summary(
    stream_report: Annotated[
        Path | None,
        typer.Option(help="a `mmops stream-demo --report` file: add the events it served"),
    ] = None,
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print the champion's data and code version, test metrics, INT8 speed-up, stream results."""
    from mmops.registry import champion_summary

    stream = None
    if stream_report is not None:
        try:
            stream = json.loads(stream_report.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{stream_report}: not JSON ({exc.msg})",
                "`mmops stream-demo --report FILE` writes it",
            ) from None
    info = champion_summary(_params(params_file, overrides).tracking.registered_model)
    by_size = ", ".join(f"{x:.2f}x at batch {n}" for n, x in info["int8_speedup"].items())
    speedup = f"INT8 vs torch: {by_size}" if by_size else "INT8 vs torch: n/a"

    rows = [
        ("champion", f"{info['model']} v{info['version']}, run {info['run_id']}"),
        ("data", f"DVC {(info['data_md5'] or '?')[:12]}, git {(info['git_commit'] or '?')[:7]}"),
        (
            "test",
            f"accuracy {_fixed(info['test_accuracy'])}, macro-F1 {_fixed(info['test_macro_f1'])}",
        ),
        ("serving", f"{info['serving'] or '?'}; {speedup}"),
    ]
    if stream is not None:
        rows.append(
            (
                "stream",
                f"{stream['predicted']}/{stream['sent']} predicted, {stream['dead_letters']} dead "
                f"letters; accuracy {_fixed(stream.get('accuracy'))}; latency p50 "
                f"{stream.get('latency_ms_p50', 0):.0f} ms, "
                f"p99 {stream.get('latency_ms_p99', 0):.0f} ms",
            )
        )
    for key, value in rows:
        typer.echo(f"{key:<9} {value}")
    if as_json:
        typer.echo(json.dumps({**info, "stream": stream}))


def _fixed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    app(prog_name="mmops")
