"""What one image of the daemon tells the next when it re-executes itself in place.

The Envoys keep running across `execve` (same PID, so still our children; the parent-
death signal fires only when the spawning thread ends: docs/FACTS-reexec.md). What
does not survive is our memory: which PID is which epoch, in which state, with which
marks and config generation; the crash budget; the request numbers; what is armed.
That is this document, written as JSON to a memfd the new image inherits (never argv).

It is taken only at a quiet moment (nothing starting, validating, planned or queued:
`reexec.py` waits for one), so a plan, a running gate command or a waiting client
never has to cross the exec. Deadlines travel as remaining seconds; the reactor's
clock is CLOCK_MONOTONIC, the same in both images, so `started_at` and friends do too.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from envoy_autoreload import HANDOVER_FD_VARIABLE, __version__

FORMAT_VERSION: Final = 1
MAX_BYTES: Final = 64 * 1024 * 1024


class HandoverError(Exception):
    """The document cannot be read; the message is one line."""


@dataclass(frozen=True, slots=True)
class GenerationRecord:
    pid: int
    epoch: int
    state: str  # GenerationState value: serving or draining
    reason: str
    started_at: float
    serving_at: float | None
    draining_since: float | None
    saw_initializing: bool
    marks: dict[str, Any]
    config: str | None  # sha256 of its config generation
    stderr_fd: int | None  # the read end of its stderr pipe, inherited
    binary: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Handover:
    generations: list[GenerationRecord]
    requests: dict[str, int]  # request_seq, seq, answered_through
    recovery: dict[str, Any]
    lineage: dict[str, str | None]  # serving, last_started, rolled_back_from (sha256)
    probation: dict[str, Any] | None
    timers: dict[str, float]  # Timer value -> seconds left
    binary: dict[str, Any] | None  # the newest binary that passed the gate
    reference: dict[str, Any] | None  # the serving content's digest, to find changes
    inherited: dict[str, int] = field(default_factory=dict)  # "control", "status": fds
    waiting_clients: list[int] = field(default_factory=list)  # `ctl reexec`: answered after
    from_version: str = __version__
    version: int = FORMAT_VERSION
    notes: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Handover:
        try:
            raw = json.loads(data)
        except ValueError as err:
            raise HandoverError(f"the hand-over is not JSON: {err}") from err
        if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
            raise HandoverError("the hand-over has an unknown format version")
        try:
            gens = [GenerationRecord(**g) for g in raw.pop("generations")]
            return cls(generations=gens, **raw)
        except (TypeError, KeyError) as err:
            raise HandoverError(f"the hand-over is malformed: {err}") from err


def write_memfd(handover: Handover) -> int:
    """The document in an anonymous file the next image inherits; its fd number."""
    fd = os.memfd_create("envoy-autoreload-handover", 0)  # no MFD_CLOEXEC: inherited
    data = handover.to_bytes()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_inherited(environ: dict[str, str] | os._Environ[str]) -> Handover | None:
    """The document the previous image left, if this image is a re-exec; the variable
    is removed at once, so no child (a start script) inherits it."""
    value = environ.pop(HANDOVER_FD_VARIABLE, None)
    if value is None:
        return None
    try:
        fd = int(value)
    except ValueError as err:
        raise HandoverError(f"{HANDOVER_FD_VARIABLE}={value!r} is no file descriptor") from err
    try:
        chunks = []
        total = 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_BYTES:
                raise HandoverError("the hand-over is larger than 64 MiB")
    except OSError as err:
        raise HandoverError(f"cannot read the hand-over: {err.strerror or err}") from err
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return Handover.from_bytes(b"".join(chunks))
