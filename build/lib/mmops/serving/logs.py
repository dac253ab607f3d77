"""Structured logs: one JSON object per line, with the fields a log call passes as data."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any


def log_data(**fields: Any) -> dict[str, Any]:
    """`extra` for a log call: fields the JSON formatter adds to the line."""
    return {"data": fields}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message and the record's `data`."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data = getattr(record, "data", None)
        if isinstance(data, Mapping):
            entry.update(data)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
