"""`mmops doctor`: find and close what a crash left behind in MLflow (runs stuck RUNNING)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from mmops.cli.common import JsonOption, ParamsOption, SetOption, command, load_command_params, say


@command()
def doctor(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="list the orphaned runs; change nothing")
    ] = False,
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Mark FAILED the experiment's RUNNING runs whose process is gone, tagged with why."""
    from mmops.tracking.orphans import close_orphaned_runs

    params = load_command_params(params_file, overrides)
    orphans = close_orphaned_runs(params, dry_run=dry_run)
    done = "orphaned" if dry_run else "marked FAILED"
    for orphan in orphans:
        say(f"{orphan.run_id} {orphan.name or '-'}: {orphan.reason}; {done}")
    say(f"{params.tracking.experiment}: {len(orphans)} RUNNING run(s) {done}")
    if as_json:
        runs = [{"run_id": o.run_id, "name": o.name, "reason": o.reason} for o in orphans]
        typer.echo(json.dumps({"dry_run": dry_run, "orphans": runs}))
