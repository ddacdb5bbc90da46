"""Both log renderings: one line per event, detail kept whole."""

from __future__ import annotations

import json
import logging

from envoy_autoreload.logs import HumanFormatter, JsonFormatter, log_event


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
