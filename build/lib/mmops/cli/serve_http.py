"""`mmops serve-http`: the Open Inference Protocol v2 over REST and gRPC (the lean install)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from mmops.cli.common import ParamsOption, SetOption, UserError, command, load_command_params


@command("serve-http")
def serve_http(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="pin a model (models:/NAME/VERSION, runs:/ or a folder); an @alias is followed. "
            "Default: models:/<tracking.registered_model>@champion, followed",
        ),
    ] = None,
    port: Annotated[int, typer.Option(help="REST port (v2 routes, /metrics, /healthz)")] = 8080,
    grpc_port: Annotated[
        int, typer.Option(help="gRPC port (inference.GRPCInferenceService); 0 = off")
    ] = 8081,
    host: Annotated[str, typer.Option(help="address to listen on")] = "0.0.0.0",
    name: Annotated[
        str | None,
        typer.Option(help="the model name routes answer to (default: the registered name)"),
    ] = None,
    log_format: Annotated[str, typer.Option(help="json (one object per line) | text")] = "json",
    params_file: ParamsOption = None,
    overrides: SetOption = None,
) -> None:
    """Serve the model over the Open Inference Protocol v2 (KServe, Triton clients), REST and gRPC.

    Concurrent requests are batched (serve.* in params). A followed alias is swapped in between
    batches, so each request is served by one version. The registry comes from
    MLFLOW_TRACKING_URI. SIGTERM or Ctrl-C stops accepting, finishes what runs and exits.
    """
    from mmops.serving.logs import JsonLogFormatter
    from mmops.serving.oip.server import OipServer

    params = load_command_params(params_file, overrides)
    if log_format not in ("json", "text"):
        raise UserError(f"--log-format {log_format!r}", "--log-format takes json or text")
    if log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())
    if not 0 < port < 65536 or not 0 <= grpc_port < 65536 or port == grpc_port:
        raise UserError(f"--port {port} --grpc-port {grpc_port}", "two different port numbers")
    ref = model or f"models:/{params.tracking.registered_model}@champion"
    server = OipServer(params, ref, name)
    try:
        server.run(host, port, grpc_port or None)
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f"cannot serve {ref}: {str(exc).strip().splitlines()[0]}", "", 1) from None
