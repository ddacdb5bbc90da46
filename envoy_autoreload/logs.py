"""Log lines: one per event, an event name plus key=value fields.

Owns the two renderings (human by default, JSON for machines) and `log_event`, the
one way modules emit an event. Configured only by `cli.py`; every other module uses
`logging.getLogger(__name__)`. Lines go to stderr unbuffered so journald/runit see
them at once (structlog's logging best practices).

Multi-line detail (a validator's output, a child's last stderr lines) travels with its
event: indented `  | ` lines in human form, one `output` field in JSON, so grep on the
event name finds it and nothing is lost.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from collections.abc import Mapping
from typing import Final, Literal

LogFormat = Literal["human", "json"]

FieldValue = str | int | float | bool | None | list[str] | list[int]
_EXTRA_EVENT: Final = "autoreload_event"
_EXTRA_FIELDS: Final = "autoreload_fields"
_EXTRA_DETAIL: Final = "autoreload_detail"


def log_event(
    logger: logging.Logger,
    level: int,
    event: str,
    message: str = "",
    *,
    detail: str | None = None,
    **fields: FieldValue,
) -> None:
    """Emit one event line; `fields` become key=value pairs (epoch=, pid=, ...).

    Fields whose value is None are left out, so callers can pass "not applicable".
    """
    if not logger.isEnabledFor(level):
        return
    logger.log(
        level,
        message,
        extra={_EXTRA_EVENT: event, _EXTRA_FIELDS: fields, _EXTRA_DETAIL: detail},
    )


def _event_of(record: logging.LogRecord) -> str:
    event = getattr(record, _EXTRA_EVENT, None)
    return event if isinstance(event, str) else record.name


def _fields_of(record: logging.LogRecord) -> Mapping[str, FieldValue]:
    fields = getattr(record, _EXTRA_FIELDS, None)
    return fields if isinstance(fields, dict) else {}


def _detail_of(record: logging.LogRecord) -> str | None:
    detail = getattr(record, _EXTRA_DETAIL, None)
    return detail if isinstance(detail, str) and detail else None


def _render_value(value: FieldValue) -> str:
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    text = "-" if value is None else str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


class HumanFormatter(logging.Formatter):
    """`12:00:03.120 INFO  child.serving epoch=1 pid=41234 startup_s=0.052 Envoy is LIVE`."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        parts = [stamp, f"{record.levelname:<5}", _event_of(record)]
        parts += [f"{k}={_render_value(v)}" for k, v in _fields_of(record).items() if v is not None]
        message = record.getMessage()
        if message:
            parts.append(message)
        line = " ".join(parts)
        detail = _detail_of(record)
        if detail:
            line += "".join(f"\n  | {d}" for d in detail.rstrip("\n").splitlines())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (RFC 3339 UTC), level, event, message, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        obj: dict[str, object] = {
            "ts": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": _event_of(record),
            "message": record.getMessage(),
        }
        fields = _fields_of(record)
        # epoch and pid are always present (null when they do not apply), so a consumer
        # can filter on them without checking for the key.
        obj["epoch"] = fields.get("epoch")
        obj["pid"] = fields.get("pid")
        obj.update((k, v) for k, v in fields.items() if v is not None)
        detail = _detail_of(record)
        if detail:
            obj["output"] = detail
        if record.exc_info:
            obj["traceback"] = self.formatException(record.exc_info)
        return json.dumps(obj, separators=(",", ":"))


def configure_logging(log_format: LogFormat, level: str) -> None:
    """Route every `envoy_autoreload` logger to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else HumanFormatter())
    root = logging.getLogger("envoy_autoreload")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
