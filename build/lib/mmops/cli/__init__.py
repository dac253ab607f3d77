"""The `mmops` command line: one thin command per pipeline stage, grouped by layer."""

from mmops.cli import data, doctor, feedback, pipeline, registry, serve_http, stream
from mmops.cli.common import app

__all__ = ["app", "data", "doctor", "feedback", "pipeline", "registry", "serve_http", "stream"]
