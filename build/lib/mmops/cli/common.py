"""What every command shares: the app, user-error reporting, common options and output helpers."""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from contextvars import ContextVar
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

# Whether the running command prints JSON, so `say` sends messages for a person to stderr.
_json_output: ContextVar[bool] = ContextVar("mmops_json_output", default=False)


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
    if _raised(exc, "mmops.evaluation.zero_shot.NotADualEncoder"):
        return UserError(str(exc), "give a CLIP or SigLIP checkpoint: a hub name or a folder")
    if isinstance(exc, ConfigError):
        return UserError(
            str(exc), "params.yaml lists every key with its default; --set takes section.key=value"
        )
    if _raised(exc, "mmops.data.dataset.DatasetError"):
        return UserError(str(exc), DATASET_HINT)
    if _raised(exc, "mmops.model.backbones.PretrainedUnavailable"):
        return UserError(
            str(exc),
            "a hub name needs the hub, or a cached copy with HF_HUB_OFFLINE=1; a folder needs "
            "the files save_pretrained writes",
        )
    if _raised(exc, "mmops.training.checkpoint.CheckpointError"):
        return UserError(str(exc), "delete the checkpoint, or train without --resume")
    if _raised(exc, "mmops.serving.integrity.DamagedModelError"):
        # Not the user's typo: the model's files are not the ones recorded; exit 1, as a fault.
        return UserError(exc.message, exc.hint, code=1)  # type: ignore[attr-defined]
    if (full := _no_room(exc)) is not None:
        return full
    # Before RegistryError: the registry turns some MLflow errors into its own, `from None`.
    if (down := _tracking_outage(exc)) is not None:
        return down
    if _raised(exc, "mmops.tracking.registry.RegistryError"):
        return UserError(
            str(exc), "`mmops models` lists the registered versions; `mmops retrain` adds one"
        )
    if _raised(exc, "mmops.local.stack.BrokerUnavailable", "kafka.errors.KafkaError"):
        return UserError(str(exc), BROKER_HINT, code=1)
    if _raised(exc, "mmops.local.stack.StackError"):
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


TRACKING_HINT = (
    "start the server, or point MLFLOW_TRACKING_URI at a running one (`mmops up` serves one "
    "locally); tracking.request_timeout_s and tracking.max_retries bound the wait"
)


def _tracking_outage(exc: Exception) -> UserError | None:
    """A tracking server that did not answer, after MLflow's retries: exit 1, as a fault."""
    if "requests" not in sys.modules:  # no HTTP request was made
        return None
    from mmops.environment import tracking_uri
    from mmops.tracking.deadlines import outage

    down = outage(exc, tracking_uri())
    if down is None:
        return None
    if down.endpoint and down.endpoint.startswith("artifacts/"):
        # The server answers, then drops an upload it cannot store: the client sees no cause.
        message = (
            f"MLflow tracking server {down.server}: storing {down.endpoint} failed "
            f"({down.cause}); its artifact store may be full or not writable"
        )
        return UserError(message, ARTIFACT_HINT, code=1)
    what = f"calling {down.endpoint}" if down.endpoint else "talking to it"
    message = f"MLflow tracking server {down.server}: unreachable ({down.cause}) while {what}"
    return UserError(message, TRACKING_HINT, code=1)


ARTIFACT_HINT = (
    "see the server's log and free space where it stores artifacts; the run is marked FAILED "
    "and nothing was registered, so the command can simply run again"
)
# A write the disk refused: full, over quota, read-only, over the file size limit.
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _no_room(exc: BaseException) -> UserError | None:
    """A write refused for lack of room (anywhere in the chain of causes): exit 1, a fault."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in NO_ROOM:
            where = f"{cause.filename}: " if cause.filename else ""
            return UserError(f"{where}{cause.strerror or cause}", ARTIFACT_HINT, code=1)
        cause = cause.__cause__ or cause.__context__
    return None


class ReportingCommand(TyperCommand):
    """A command whose user mistakes print as one `error:` line and one `hint:` line.

    `mmops -v` or MMOPS_DEBUG=1 raises them instead, with the traceback.
    """

    def invoke(self, ctx: typer.Context) -> Any:
        # With --json, stdout carries the JSON object alone (`mmops ... --json | jq` works).
        _json_output.set(bool(ctx.params.get("as_json")))
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
JsonOption = Annotated[
    bool, typer.Option("--json", help="print one JSON object on stdout; messages go to stderr")
]
MetricsOption = Annotated[
    Path | None, typer.Option("--metrics", help="write metrics JSON here (for dvc metrics)")
]


def _print_version(value: bool) -> None:
    if value:
        from mmops import __version__

        typer.echo(f"mmops {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="debug logging; errors with their traceback")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="print the version and exit"
        ),
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


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def load_command_params(path: Path | None, overrides: list[str] | None) -> Params:
    from mmops.tracking.deadlines import apply_deadlines

    params = resolve_params(path, overrides or [])
    # Every command that reaches MLflow gives up within the deadlines in params (tracking).
    apply_deadlines(params.tracking)
    return params


def say(message: str) -> None:
    """A message for a person: stdout, or stderr when the command prints JSON (`--json`)."""
    typer.echo(message, err=_json_output.get())
