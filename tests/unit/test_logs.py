"""Both log renderings: one line per event, detail kept whole."""

from __future__ import annotations

import json
import logging
import time

import pytest

from envoy_autoreload import logs
from envoy_autoreload.logs import (
    HumanFormatter,
    JsonFormatter,
    batched_output,
    flush_logs,
    log_event,
)
from envoy_autoreload.turn_buffer import TurnBuffer


def _record(caplog_records: list[logging.LogRecord]) -> logging.LogRecord:
    assert len(caplog_records) == 1
    return caplog_records[0]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _emit() -> logging.LogRecord:
    logger = logging.getLogger("envoy_autoreload.test_logs")
    capture = _Capture()
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    try:
        log_event(
            logger,
            logging.ERROR,
            "restart.failed",
            "epoch 2 failed",
            detail="line one\nline two\n",
            epoch=2,
            pid=41234,
            cause="exit status 1",
        )
    finally:
        logger.removeHandler(capture)
    return _record(capture.records)


def test_human_line_has_event_fields_and_indented_detail() -> None:
    text = HumanFormatter().format(_emit())
    first, *rest = text.splitlines()
    assert "ERROR restart.failed epoch=2 pid=41234" in first
    assert 'cause="exit status 1"' in first and first.endswith("epoch 2 failed")
    assert rest == ["  | line one", "  | line two"]


def test_json_line_is_one_object_with_output_field() -> None:
    text = JsonFormatter().format(_emit())
    assert "\n" not in text
    obj = json.loads(text)
    assert obj["event"] == "restart.failed" and obj["level"] == "error"
    assert obj["epoch"] == 2 and obj["pid"] == 41234
    assert obj["output"] == "line one\nline two\n"
    assert obj["ts"].endswith("Z")


def test_a_turns_lines_are_written_when_it_ends_with_the_time_they_were_logged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Formatting waits for the end of the loop's turn (a restart's spawn comes first,
    issue 16); the line keeps its own time and order, and a flush mid-turn (a re-exec)
    writes everything."""
    capture = _Capture()
    logger = _logging_to(monkeypatch, capture, TurnBuffer(capture))
    log_event(logger, logging.INFO, "outside.turn")
    assert [_event(r) for r in capture.records] == ["outside.turn"]
    with batched_output():
        log_event(logger, logging.INFO, "first")
        log_event(logger, logging.INFO, "second")
        logged_by = time.time()
        assert len(capture.records) == 1, "written before the turn ended"
    assert [_event(r) for r in capture.records[1:]] == ["first", "second"]
    assert all(r.created <= logged_by for r in capture.records[1:])
    with batched_output():
        log_event(logger, logging.INFO, "before.exec")
        flush_logs(timeout_s=1.0)
        assert [_event(r) for r in capture.records[3:]] == ["before.exec"]
    assert len(capture.records) == 4, "written twice"


def _logging_to(
    monkeypatch: pytest.MonkeyPatch, capture: _Capture, buffer: TurnBuffer | None
) -> logging.Logger:
    """The daemon's loggers as `configure_logging` leaves them, `capture` formatting and
    writing, behind `buffer` (None: as before the loop's first turn)."""
    root = logging.getLogger("envoy_autoreload")
    monkeypatch.setattr(root, "handlers", [buffer or capture])
    monkeypatch.setattr(root, "propagate", False)
    monkeypatch.setattr(logs, "_handler", capture)
    monkeypatch.setattr(logs, "_turn_buffer", buffer)
    monkeypatch.setattr(logs, "_relay", None)
    logger = logging.getLogger("envoy_autoreload.test_turns")
    logger.setLevel(logging.INFO)
    return logger


def _event(record: logging.LogRecord) -> object:
    return getattr(record, "autoreload_event", None)


def test_the_loops_first_turn_puts_the_turn_buffer_in_front_of_the_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before the loop runs, each line is written at once through the handler itself
    (the buffer's module is not imported before the start-up check, issue 16); from
    the first turn on, a turn's lines wait for its end."""
    capture = _Capture()
    logger = _logging_to(monkeypatch, capture, None)
    log_event(logger, logging.INFO, "at.start.up")
    assert [_event(r) for r in capture.records] == ["at.start.up"]
    with batched_output():
        log_event(logger, logging.INFO, "in.the.first.turn")
        assert len(capture.records) == 1, "written before the turn ended"
    assert [_event(r) for r in capture.records] == ["at.start.up", "in.the.first.turn"]
    assert [type(h) for h in logging.getLogger("envoy_autoreload").handlers] == [TurnBuffer]
