"""JSON logs, one event per line, each stamped with the shared monotonic clock.

`mono` is CLOCK_MONOTONIC, which every process and container on one Linux host shares, so
tests and the chaos checker can line up several nodes' logs and the emulator's history on
one time axis. `wall` is for people. Structured fields come from `extra={...}`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

#: What every LogRecord carries: anything else on a record is a structured field (`extra`).
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


class JsonLines(logging.Formatter):
    """One JSON object per record: `wall`, `level`, `logger`, `message`, then every field
    the record was given (`extra=`, and `mono` and `node` from `_Stamp`), then `exc_info`
    and `stack_info` as text when present. A value JSON cannot carry is written as str().

    Ours rather than python-json-logger's: this is all of it that we used, and the library
    cost every node 0.3 MiB of RSS (`bench/footprint.py` prints it per module)."""

    def __init__(self) -> None:
        super().__init__(datefmt="%Y-%m-%dT%H:%M:%S%z")

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "wall": self.formatTime(record, self.datefmt),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                fields[key] = value
        if record.exc_info:
            fields["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            fields["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(fields, default=str, ensure_ascii=False)


class _Stamp(logging.Filter):
    def __init__(self, node_id: int | None) -> None:
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.mono = round(time.monotonic(), 6)
        if self.node_id is not None and not hasattr(record, "node"):
            record.node = self.node_id
        return True


def setup(level: str = "info", node_id: int | None = None, stream: Any = None) -> None:
    """Send every log record to `stream` (stderr) as one JSON object per line."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLines())
    handler.addFilter(_Stamp(node_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO; the sidecar reports API calls itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("hypercorn").setLevel(logging.WARNING)
