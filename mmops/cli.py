"""The `mmops` command line: one thin command per pipeline stage."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated

import typer

from mmops.config import ConfigError, Params, resolve_params

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)

ParamsOption = Annotated[
    Path | None,
    typer.Option("--params", help="params file (default: ./params.yaml if present, else defaults)"),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a params key for this run, e.g. --set validate.workers=1"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """mmops: versioned, validated multimodal data to tracked models and streaming predictions."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # GX logs its own start-up at INFO; only its warnings concern a user.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)


def _params(path: Path | None, overrides: list[str] | None) -> Params:
    try:
        return resolve_params(path, overrides or [])
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command("demo-data")
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
    try:
        manifest = make_demo_data(out_dir, n=n, seed=seed, image_size=cfg.image_size)
    except FileExistsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    seconds = round(time.perf_counter() - start, 2)
    typer.echo(f"wrote {n} examples to {manifest} in {seconds}s")
    if as_json:
        typer.echo(
            json.dumps({"manifest": str(manifest), "n": n, "seed": seed, "seconds": seconds})
        )


@app.command()
def validate(
    data_dir: Annotated[Path, typer.Argument(help="dataset directory")],
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    out: Annotated[
        Path | None, typer.Option(help="write validation.json, gx_result.json, report.html")
    ] = None,
    metrics: Annotated[
        Path | None, typer.Option(help="write flat metrics JSON (for dvc metrics)")
    ] = None,
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
        metrics.parent.mkdir(parents=True, exist_ok=True)
        metrics.write_text(json.dumps(report.metrics(), indent=2) + "\n")
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


@app.command("data-version")
def data_version_cmd(
    data_dir: Annotated[Path, typer.Argument(help="dataset directory")],
    as_json: JsonOption = False,
) -> None:
    """Print the DVC content hash and git commit of a dataset."""
    from mmops.versioning import data_version

    try:
        version = data_version(data_dir)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    state = "matches DVC's record" if version.tracked else f"DVC records {version.dvc_md5}"
    typer.echo(
        f"{data_dir}: md5 {version.md5} ({version.nfiles} files), {state}, "
        f"git {version.git_commit}{' (dirty)' if version.git_dirty else ''}"
    )
    if as_json:
        typer.echo(json.dumps(version.to_dict()))
