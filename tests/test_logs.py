"""Logs are JSON lines whose fields tests, the chaos checker and operators' tools read."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from sidecar import logs


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    logs.setup("info", node_id=3, stream=stream)
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_record_is_one_json_line_with_its_fields_and_its_extras(lines: io.StringIO) -> None:
    logging.getLogger("sidecar.x").info(
        "peer %s restarted", 2, extra={"event": "peer_restarted", "peer": 2, "when": 1.5}
    )
    [record] = records(lines)
    assert list(record)[:4] == ["wall", "level", "logger", "message"]
    assert record["level"] == "INFO"
    assert record["logger"] == "sidecar.x"
    assert record["message"] == "peer 2 restarted"
    assert (record["event"], record["peer"], record["when"], record["node"]) == (
        "peer_restarted",
        2,
        1.5,
        3,
    )
    assert isinstance(record["mono"], float)
    assert str(record["wall"]).startswith("20") and "T" in str(record["wall"])
    for standard in ("args", "msg", "levelno", "pathname", "exc_info", "taskName"):
        assert standard not in record


def test_an_exception_is_logged_as_text_and_odd_values_as_str(lines: io.StringIO) -> None:
    log = logging.getLogger("sidecar.x")
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("failed", extra={"what": {1, 2}.__class__, "path": object()})
    log.info("na\u00efve \u2713")
    failed, naive = records(lines)
    assert "ValueError: bad" in str(failed["exc_info"])
    assert failed["level"] == "ERROR"
    assert failed["what"] == "<class 'set'>"
    assert str(failed["path"]).startswith("<object object")
    assert naive["message"] == "na\u00efve \u2713"
    assert len(lines.getvalue().splitlines()) == 2  # a traceback stays inside its line
