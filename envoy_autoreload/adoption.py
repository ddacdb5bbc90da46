"""Turning the core's state into a hand-over and back (re-exec in place).

`export_state` runs in the old image at a quiet moment; `restore_state` in the new one,
before its loop runs. Each piece of state stays owned by its module (the roster adopts
generations, recovery restores its budget, probation its watch); this module only
carries it across and rebuilds what cannot be pickled: each child's process handle
(from its PID and inherited stderr pipe) and the serving content's digest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from envoy_autoreload import __version__
from envoy_autoreload.batches import Batches
from envoy_autoreload.content import digest_of_files
from envoy_autoreload.control import ControlReply
from envoy_autoreload.digest import Snapshot
from envoy_autoreload.envoy_binary import BinaryInfo
from envoy_autoreload.gatekeeper import Gatekeeper
from envoy_autoreload.handover import GenerationRecord, Handover
from envoy_autoreload.launcher import Launcher
from envoy_autoreload.lineage import Lineage
from envoy_autoreload.logs import log_event
from envoy_autoreload.ports import EnvoyFacts, Reactor
from envoy_autoreload.probation import Probation
from envoy_autoreload.recovery import Recovery
from envoy_autoreload.roster import Generation, Roster
from envoy_autoreload.states import GenerationState, Marks

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class CoreParts:
    """The modules whose state crosses a re-exec."""

    reactor: Reactor
    roster: Roster
    batches: Batches
    recovery: Recovery
    lineage: Lineage
    probation: Probation
    gatekeeper: Gatekeeper
    family: EnvoyFacts
    launcher: Launcher  # empties Envoy's stderr pipes before the exec


def export_state(parts: CoreParts) -> Handover:
    """Everything the next image needs; each child's stderr pipe is made inheritable."""
    serving = parts.roster.serving()
    lineage = parts.lineage
    return Handover(
        generations=[_record(gen) for gen in parts.roster.alive()],
        requests={
            "request_seq": parts.batches.request_seq,
            "seq": parts.batches.seq,
            "answered_through": parts.batches.answered_through,
        },
        recovery=parts.recovery.export(),
        lineage={
            "serving": _sha(lineage.serving),
            "last_started": _sha(lineage.last_started),
            "rolled_back_from": _sha(lineage.rolled_back_from),
        },
        probation=parts.probation.export(parts.reactor.now()),
        timers={},
        binary=_binary_to_json(parts.gatekeeper.binary),
        reference=_snapshot_to_json(serving.snapshot) if serving is not None else None,
    )


def restore_state(parts: CoreParts, handover: Handover) -> list[Generation]:
    """Take over the generations and state the previous image handed over."""
    adopted = [_adopt(parts, record) for record in handover.generations]
    batches = parts.batches
    batches.request_seq = handover.requests.get("request_seq", 0)
    batches.seq = handover.requests.get("seq", 0)
    batches.answered_through = handover.requests.get("answered_through", 0)
    parts.recovery.restore(handover.recovery)
    lineage = parts.lineage
    lineage.serving = lineage.get(handover.lineage.get("serving"))
    lineage.last_started = lineage.get(handover.lineage.get("last_started"))
    lineage.rolled_back_from = lineage.get(handover.lineage.get("rolled_back_from"))
    parts.gatekeeper.binary = _binary_from_json(handover.binary)
    serving = parts.roster.serving()
    if serving is not None:
        serving.snapshot = _snapshot_from_json(handover.reference)
    probation = handover.probation
    if probation is not None:
        gen = next((g for g in adopted if g.pid == probation.get("pid")), None)
        if gen is not None and gen is serving:
            parts.probation.restore(probation, gen)
    return adopted


def _record(gen: Generation) -> GenerationRecord:
    return GenerationRecord(
        pid=gen.pid,
        epoch=gen.epoch,
        state=gen.state.value,
        reason=gen.reason,
        started_at=gen.started_at,
        serving_at=gen.serving_at,
        draining_since=gen.draining_since,
        saw_initializing=gen.saw_initializing,
        marks=dataclasses.asdict(gen.marks),
        config=_sha(gen.config),
        stderr_fd=gen.process.inheritable_stderr_fd(),
        binary=_binary_to_json(gen.binary),
    )


def _adopt(parts: CoreParts, record: GenerationRecord) -> Generation:
    process = parts.roster.processes().adopt(record.pid, record.stderr_fd)
    gen = Generation(
        epoch=record.epoch,
        process=process,
        reason=record.reason,
        started_at=record.started_at,
        state=GenerationState(record.state),
        marks=Marks(**record.marks),
        serving_at=record.serving_at,
        draining_since=record.draining_since,
        saw_initializing=record.saw_initializing,
        binary=_binary_from_json(record.binary),
        config=parts.lineage.get(record.config),
    )
    parts.roster.adopt(gen)
    if record.stderr_fd is not None:
        os.set_inheritable(record.stderr_fd, False)  # a start script must not get it
        parts.reactor.add_reader(record.stderr_fd, gen)
    parts.family.observe(gen)
    return gen


def _sha(config: Any) -> str | None:
    return config.sha256 if config is not None else None


def _binary_to_json(binary: BinaryInfo | None) -> dict[str, Any] | None:
    if binary is None:
        return None
    return {
        "path": str(binary.path),
        "identity": list(binary.identity),
        "version": binary.version,
        "hot_restart_version": binary.hot_restart_version,
    }


def _binary_from_json(raw: dict[str, Any] | None) -> BinaryInfo | None:
    if raw is None:
        return None
    dev, ino, size, mtime = (int(part) for part in raw["identity"])
    identity = (dev, ino, size, mtime)
    return BinaryInfo(Path(raw["path"]), identity, raw["version"], raw["hot_restart_version"])


def _snapshot_to_json(snapshot: Snapshot | None) -> dict[str, Any] | None:
    if snapshot is None:
        return None
    return {
        "files": dict(snapshot.files),
        "digest": snapshot.digest,
        "directories": sorted(str(d) for d in snapshot.directories),
        "watch_points": snapshot.watch_points,
        "unreadable": list(snapshot.unreadable),
        "missing": list(snapshot.missing),
        "name_watched": sorted(str(d) for d in snapshot.name_watched),
        "by_stat": list(snapshot.by_stat),
        "not_walked": list(snapshot.not_walked),
    }


def _snapshot_from_json(raw: dict[str, Any] | None) -> Snapshot | None:
    if raw is None:
        return None
    files = dict(raw["files"])
    return Snapshot(
        files=files,
        # Computed again, not trusted: the image before may have digested otherwise, and
        # a digest that differs from this image's for the same files restarts Envoy.
        digest=digest_of_files(files),
        directories=frozenset(Path(d) for d in raw["directories"]),
        watch_points=raw["watch_points"],
        unreadable=tuple(raw["unreadable"]),
        missing=tuple(raw["missing"]),
        name_watched=frozenset(Path(d) for d in raw["name_watched"]),
        by_stat=tuple(raw["by_stat"]),
        not_walked=tuple(raw["not_walked"]),
    )


def adopt_family(
    parts: CoreParts,
    handover: Handover,
    current: Snapshot | None,
    request_restart: Callable[[str, list[str] | None], int],
) -> None:
    """The new image's start: the handed-over family, the clients that asked for the
    re-exec answered, and a change made while nobody watched turned into a request."""
    adopted = restore_state(parts, handover)
    serving = parts.roster.serving()
    log_event(
        logger,
        logging.INFO,
        "daemon.adopted",
        f"took over from envoy-autoreload {handover.from_version}",
        version=__version__,
        epochs=[g.epoch for g in adopted],
        pids=[g.pid for g in adopted],
        config=serving.config_short if serving is not None else None,
    )
    message = f"re-executed: envoy-autoreload {__version__} took over from {handover.from_version}"
    reply = ControlReply(True, message, serving.epoch if serving is not None else None)
    for fd in handover.waiting_clients:
        _answer(fd, reply)
    reference = serving.snapshot if serving is not None else None
    if current is not None and reference is not None and current.digest != reference.digest:
        request_restart("files_changed", current.changed_since(reference))


def _answer(fd: int, reply: ControlReply) -> None:
    """A `ctl reexec` client the old image handed over: told the outcome, then closed."""
    with contextlib.suppress(OSError), socket.socket(fileno=fd) as sock:
        sock.setblocking(False)
        sock.send(reply.encode())  # a client that went away has nothing to be told
