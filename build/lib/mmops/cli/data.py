"""Commands of the data stage: the demo dataset, validation and the data version."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from mmops.cli.common import (
    JsonOption,
    MetricsOption,
    ParamsOption,
    SetOption,
    command,
    load_command_params,
    say,
    write_json,
)


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
    from mmops.data.demo import make_demo_data

    cfg = load_command_params(params_file, overrides).demo_data
    n, seed = n if n is not None else cfg.n, seed if seed is not None else cfg.seed
    start = time.perf_counter()
    manifest = make_demo_data(out_dir, n=n, seed=seed, image_size=cfg.image_size)
    seconds = round(time.perf_counter() - start, 2)
    say(f"wrote {n} examples to {manifest} in {seconds}s")
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
    """Check a dataset; exit 0 when it is fit to train on, 1 when not.

    The report records the data version (DVC md5) it checked: training takes only that version.
    """
    from mmops.data.validate import validate_dataset
    from mmops.data.validation_report import write_report

    params = load_command_params(params_file, overrides)
    start = time.perf_counter()
    report = validate_dataset(data_dir, params)
    seconds = round(time.perf_counter() - start, 2)
    for check in report.failed:
        say(f"FAIL {check.name}: {check.summary()}")
    if out is not None:
        say(f"report: {write_report(report, out)}")
    if metrics is not None:
        write_json(metrics, report.metrics())
    verdict = (
        "fit to train on"
        if report.success
        else f"NOT fit to train on ({len(report.failed)} checks failed)"
    )
    rows = report.stats.get("rows", 0)
    say(
        f"{data_dir}: {rows} rows, {len(report.checks)} checks, {verdict}; data version "
        f"{report.data_md5} [{seconds}s]"
    )
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    raise typer.Exit(0 if report.success else 1)


@command("data-version")
def data_version_cmd(
    data_dir: Annotated[Path, typer.Argument(help="dataset directory")],
    as_json: JsonOption = False,
) -> None:
    """Print the DVC content hash and git commit of a dataset."""
    from mmops.data.versioning import data_version

    version = data_version(data_dir)
    state = "matches DVC's record" if version.tracked else f"DVC records {version.dvc_md5}"
    say(
        f"{data_dir}: md5 {version.md5} ({version.nfiles} files), {state}, "
        f"git {version.git_commit}{' (dirty)' if version.git_dirty else ''}"
    )
    if as_json:
        typer.echo(json.dumps(version.to_dict()))
