"""Whether an `mmops ...` command line written in a deployment file would run, by the real CLI."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

import mmops.cli
from mmops.config import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[2]


def mmops_command_error(args: list[str]) -> str | None:
    """Why `mmops *args` would not start (command, option, value, params key), else None."""
    app = typer.main.get_command(mmops.cli.app)
    sub, *rest = args
    if sub not in app.commands:
        return f"`mmops {sub}` is no mmops command"
    try:
        app.commands[sub].make_context(sub, list(rest))
    except Exception as exc:  # typer vendors click: not click.ClickException
        if not hasattr(exc, "format_message"):
            raise
        return f"mmops {sub} {shlex.join(rest)}: {exc.format_message()}"
    overrides = [
        word.split("=", 1)[1] if "=" in word else rest[i + 1]
        for i, word in enumerate(rest)
        if word.split("=")[0] == "--set"
    ]
    try:
        load_params(ROOT / "params.yaml", overrides)
    except ConfigError as exc:
        return f"mmops {sub}: {exc}"
    return None
