"""JSON logs, one event per line, each stamped with the shared monotonic clock.

`mono` is CLOCK_MONOTONIC, which every process and container on one Linux host shares, so
tests and the chaos checker can line up several nodes' logs and the emulator's history on
one time axis. `wall` is for people. Structured fields come from `extra={...}`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from pythonjsonlogger.json import JsonFormatter


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
    handler.setFormatter(
        JsonFormatter(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "wall", "levelname": "level", "name": "logger"},
            datefmt="%Y-%m-%dT%H:%M:%S%z",
        )
    )
    handler.addFilter(_Stamp(node_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO; the sidecar reports API calls itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("hypercorn").setLevel(logging.WARNING)
