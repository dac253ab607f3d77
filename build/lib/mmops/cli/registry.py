"""Commands of the registry: the retrain flow and its schedule, versions, promotion, rollback,
the promotion lease, and the champion summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mmops.cli.common import (
    JsonOption,
    ParamsOption,
    ReportingCommand,
    SetOption,
    UserError,
    app,
    command,
    load_command_params,
    say,
)


@command()
def retrain(
    data: Annotated[Path | None, typer.Option("--data", help="dataset (default: data.dir)")] = None,
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    out: Annotated[
        Path | None, typer.Option(help="run folder (default: runs/<UTC timestamp>)")
    ] = None,
    with_feedback: Annotated[
        bool,
        typer.Option(
            "--with-feedback",
            help="first `mmops feedback`, then train on feedback.merged_dir",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Run the Prefect flow: validate, train, evaluate, export, register, gate, promote."""
    import os

    # Without PREFECT_API_URL the flow starts a temporary local API; its first start creates
    # the database, which takes longer than Prefect's default 20 s wait on a small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from mmops.data.validate import DatasetRejected
    from mmops_flows.retrain import retrain_and_evaluate

    params = load_command_params(params_file, overrides)
    data_dir = str(data or params.data.dir)
    try:
        result = retrain_and_evaluate(
            data_dir=data_dir,
            params_file=str(params_file) if params_file else None,
            overrides=list(overrides or []),
            out_dir=str(out) if out else None,
            with_feedback=with_feedback,
        )
    except DatasetRejected as exc:
        typer.echo(f"error: {exc}; nothing trained, registry untouched", err=True)
        if as_json:
            typer.echo(json.dumps({"promoted": False, "error": str(exc)}))
        raise typer.Exit(1) from None
    verdict = result.verdict
    say(
        f"{result.model} v{result.version}: accuracy "
        f"{result.evaluation.classification.accuracy:.4f}; gate "
        + ("passed" if verdict.passed else "rejected (" + "; ".join(verdict.reasons) + ")")
        + f"; {'promoted' if result.promoted else 'not promoted'}; "
        f"champion {'v' + result.champion if result.champion else 'none'}"
    )
    if as_json:
        typer.echo(json.dumps(result.to_dict()))


@command()
def promote(
    version: Annotated[str, typer.Argument(help="model version to make champion")],
    reason: Annotated[str, typer.Option("--reason", help="why, recorded on the version")],
    params_file: ParamsOption = None,
    overrides: SetOption = None,
) -> None:
    """Move the champion alias to VERSION by hand (no gate), recording who, when and why."""
    from mmops.tracking.registry import promote as promote_version

    name = load_command_params(params_file, overrides).tracking.registered_model
    if promote_version(name, version, reason):
        say(f"{name}: champion is v{version}")
    else:
        say(f"{name}: v{version} is already the champion; nothing changed or recorded")


@command()
def rollback(
    reason: Annotated[str, typer.Option("--reason", help="why")] = "rollback",
    params_file: ParamsOption = None,
    overrides: SetOption = None,
) -> None:
    """Move the champion alias back to the previous champion; again, to the one before it."""
    from mmops.tracking.registry import rollback as rollback_champion

    name = load_command_params(params_file, overrides).tracking.registered_model
    version = rollback_champion(name, reason)
    say(f"{name}: champion is back to v{version}")


@command()
def models(
    params_file: ParamsOption = None, overrides: SetOption = None, as_json: JsonOption = False
) -> None:
    """List the registered versions with their aliases and key metrics."""
    from mmops.tracking.registry import list_versions

    name = load_command_params(params_file, overrides).tracking.registered_model
    versions = list_versions(name)
    if not versions:
        from mmops.environment import tracking_uri
        from mmops.tracking.deadlines import redacted

        where = redacted(tracking_uri())  # never a password in the URI
        say(f"{name}: no registered versions in {where} (`mmops retrain` adds one)")
    for v in versions:
        tags = v["tags"]
        say(
            f"v{v['version']:<4} {','.join(v['aliases']) or '-':<22} "
            f"accuracy {tags.get('test.accuracy', '?')[:6]}  gate "
            f"{tags.get('mmops.gate.passed', '?'):<5} data {tags.get('data.md5', '?')[:12]}  "
            f"run {v['run_id']}"
        )
    if as_json:
        typer.echo(json.dumps({"model": name, "versions": versions}))


lease_app = typer.Typer(
    no_args_is_help=True,
    help="The promotion lease on a registered model: what promote and the gate hold.",
)
app.add_typer(lease_app, name="lease")


@lease_app.command("release", cls=ReportingCommand)
def lease_release(
    model: Annotated[str, typer.Argument(help="registered model name")],
    force: Annotated[
        bool, typer.Option("--force", help="delete the lease even if its holder may be alive")
    ] = False,
) -> None:
    """Free the promotion lease of a holder that is gone (a promote killed while holding it)."""
    import time

    from mmops.environment import mlflow_client
    from mmops.tracking.lease import Lease, read_lease, release_lease

    client = mlflow_client()
    try:
        held = release_lease(client, model) if force else read_lease(client, model)
    except LookupError:
        raise UserError(
            f"{model}: no such registered model",
            "give the registered model's name (params.yaml tracking.registered_model)",
        ) from None
    if held is None:
        say(f"{model}: no promotion lease is held; nothing to release")
        return
    holder = Lease(**held).describe(time.time())
    if not force:
        raise UserError(
            f"{model}: the promotion lease is held by {holder}; not released",
            f"if that holder is gone, `mmops lease release {model} --force` frees it; a holder "
            "still at work would then promote without it",
        )
    say(f"{model}: released the promotion lease held by {holder}")


@command()
def schedule(
    data: Annotated[Path | None, typer.Option("--data", help="dataset (default: data.dir)")] = None,
    params_file: ParamsOption = None,
    overrides: SetOption = None,
) -> None:
    """Serve the retrain flow as a Prefect deployment on the cron schedule in params.yaml."""
    from mmops_flows.retrain import serve_schedule

    params = load_command_params(params_file, overrides)
    cfg = params.schedule
    say(f"serving deployment {cfg.name!r}: cron {cfg.cron!r} ({cfg.timezone}); Ctrl-C stops")
    serve_schedule(
        str(data or params.data.dir),
        params,
        str(params_file) if params_file else None,
        list(overrides or []),
    )


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
    from mmops.tracking.registry import champion_summary

    stream = None
    if stream_report is not None:
        try:
            stream = json.loads(stream_report.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{stream_report}: not JSON ({exc.msg})",
                "`mmops stream-demo --report FILE` writes it",
            ) from None
    info = champion_summary(load_command_params(params_file, overrides).tracking.registered_model)
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
        say(f"{key:<9} {value}")
    if as_json:
        typer.echo(json.dumps({**info, "stream": stream}))


def _fixed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
