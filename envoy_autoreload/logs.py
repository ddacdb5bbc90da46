"""Log lines: one per event, an event name plus key=value fields.

Owns the two renderings (human by default, JSON for machines) and `log_event`, the
one way modules emit an event. Configured only by `cli.py`; every other module uses
`logging.getLogger(__name__)`. Lines go to stderr unbuffered so journald/runit see
them at once (structlog's logging best practices).

Multi-line detail (a validator's output, a child's last stderr lines) travels with its
event: indented `  | ` lines in human form, one `output` field in JSON, so grep on the
event name finds it and nothing is lost.

Envoy's own lines (`envoy.output` through ENVOY_LOGGER, JSON format only) are Envoy's
to filter, with its `-l`: --log-level sets what the daemon says, and an Envoy crash
backtrace must not vanish because the daemon logs at `warning`. In human format the
same bytes pass through untouched, so both formats show the same lines. Each record
takes the level Envoy printed (`[critical]` is CRITICAL), so a consumer can filter on it.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Final, Literal

from envoy_autoreload.relay import RelayStream, StderrRelay

if TYPE_CHECKING:
    from envoy_autoreload.turn_buffer import TurnBuffer

_relay: StderrRelay | None = None
_handler: logging.Handler | None = None  # formats and writes, behind the turn buffer
_turn_buffer: TurnBuffer | None = None  # from the loop's first turn on
EXIT_FLUSH_S: Final = 2.0

LogFormat = Literal["human", "json"]

FieldValue = str | int | float | bool | None | list[str] | list[int]
_EXTRA_EVENT: Final = "autoreload_event"
_EXTRA_FIELDS: Final = "autoreload_fields"
_EXTRA_DETAIL: Final = "autoreload_detail"

ENVOY_LOGGER: Final = "envoy_autoreload.envoy"
"""The logger Envoy's own stderr lines go through; it ignores --log-level."""

# Envoy's default line format is `[%Y-%m-%d %T.%e][%t][%l][%n] %v`: the level is the
# third bracketed field. Anything else (a custom --log-format, a backtrace's
# continuation, the start script's own output) keeps the level it was logged at.
_ENVOY_PREFIX: Final = re.compile(
    r"\[[^\]]*\]\[[^\]]*\]\[(trace|debug|info|warning|error|critical)\]"
)
_ENVOY_LEVELS: Final = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


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


def envoy_line_level(line: str, default: int = logging.INFO) -> int:
    """The logging level of one line of Envoy's stderr: the level Envoy printed in its
    prefix (`[2025-01-01 12:00:00.123][41][critical][main] ...` is CRITICAL), else
    `default` (a backtrace's continuation, a start script's own output)."""
    match = _ENVOY_PREFIX.match(line)
    return default if match is None else _ENVOY_LEVELS[match.group(1)]


class _EnvoyLineLevel(logging.Filter):
    """Gives each record of ENVOY_LOGGER the level Envoy printed, whatever level the
    caller logged it at; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        level = envoy_line_level(record.getMessage(), record.levelno)
        if level != record.levelno:
            record.levelno = level
            record.levelname = logging.getLevelName(level)
        return True


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
    """Route every `envoy_autoreload` logger to stderr in the chosen format; `level`
    applies to the daemon's own events, not to Envoy's lines (ENVOY_LOGGER)."""
    global _relay, _handler, _turn_buffer  # configured once per process, by the CLI
    if _relay is None and hasattr(sys.stderr, "buffer"):
        _relay = StderrRelay(sys.stderr.buffer)
        atexit.register(_relay.flush, EXIT_FLUSH_S)
    stream = RelayStream(_relay) if _relay is not None else sys.stderr
    handler: logging.Handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else HumanFormatter())
    _handler, _turn_buffer = handler, None
    root = logging.getLogger("envoy_autoreload")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    envoy = logging.getLogger(ENVOY_LOGGER)
    envoy.setLevel(logging.DEBUG)  # records still reach `handler` through propagation
    envoy.filters[:] = [_EnvoyLineLevel()]


@contextlib.contextmanager
def batched_output() -> Iterator[None]:
    """Around one loop turn: what it logs is formatted and written once the turn ends
    (`TurnBuffer`), and the relay's writer woken once (`relay.py`)."""
    buffer = _turn_buffer if _turn_buffer is not None else _hold_turns()
    with _relay.batched() if _relay is not None else contextlib.nullcontext():
        if buffer is None:
            yield
            return
        buffer.holding = True
        try:
            yield
        finally:
            buffer.holding = False
            buffer.flush()


def _hold_turns() -> TurnBuffer | None:
    """The turn buffer, put in front of the handler at the loop's first turn: at
    `configure_logging` it would import `logging.handlers` before the start-up check
    has started (turn_buffer.py). Until then each line is written at once."""
    global _turn_buffer
    if _handler is None:
        return None  # logging is not configured (a test, a library use)
    from envoy_autoreload.turn_buffer import TurnBuffer

    _turn_buffer = TurnBuffer(_handler)
    logging.getLogger("envoy_autoreload").handlers[:] = [_turn_buffer]
    return _turn_buffer


def flush_logs(timeout_s: float = EXIT_FLUSH_S) -> None:
    """Everything logged so far reaches stderr: before an `execve`, which ends the
    relay's thread with whatever it still holds."""
    for handler in logging.getLogger("envoy_autoreload").handlers:
        handler.flush()
    if _relay is not None:
        _relay.flush(timeout_s)


def write_stderr(data: bytes) -> None:
    """Bytes to our stderr (Envoy's output passed through), never blocking the loop once
    logging is configured (see `relay.py`)."""
    if _relay is not None:
        _relay.write(data)
        return
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    try:
        if out is not None:
            out.write(data)
            out.flush()
        else:
            sys.stderr.write(data.decode(errors="replace"))
    except (OSError, ValueError):
        pass  # our own stderr is gone (closed terminal); the tail is still kept
