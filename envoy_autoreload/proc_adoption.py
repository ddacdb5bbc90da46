"""The last resort of a re-exec: the hand-over could not be read, but Envoy still runs.

Starting epoch 0 then would fail (the family holds the base id's shared memory and
domain sockets) or, worse, a cold start would mean stopping a serving proxy. So the new
image rebuilds what it can from /proc instead: its children running Envoy, each one's
epoch from its command line (the newest serves, the older ones drain), its config
generation from a `-c` that names a snapshot, and its stderr pipe found among our
inherited descriptors by the pipe's inode. What is lost is said in one line: marks,
request numbers, the crash budget's history, probation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from envoy_autoreload.envoy_process import _children_of, find_envoy
from envoy_autoreload.handover import GenerationRecord, Handover

LOST = "marks, request numbers, the crash budget's history and any probation"


@dataclass(frozen=True, slots=True)
class Listeners:
    """Where our inherited listening sockets were bound: found again by address, so
    the new image serves them instead of failing to bind over itself."""

    control: Path | None
    status: tuple[str, int] | None


def handover_from_proc(pid: int, now: float, listeners: Listeners) -> Handover | None:
    """A hand-over rebuilt from what /proc shows of `pid`'s children; None when no
    Envoy of ours runs (a normal start is then right)."""
    found = []
    for child in _children_of(pid):
        envoy = find_envoy(child)
        if envoy is not None and envoy.command_line.restart_epoch is not None:
            found.append((envoy.command_line.restart_epoch, child, envoy.command_line.config_path))
    if not found:
        return None
    found.sort()
    pipes = _our_pipes()
    newest = found[-1][0]
    records = [
        GenerationRecord(
            pid=child,
            epoch=epoch,
            state="serving" if epoch == newest else "draining",
            reason="adopted",
            started_at=now,
            serving_at=now,
            draining_since=None if epoch == newest else now,
            saw_initializing=True,
            marks={},
            config=_snapshot_sha(config),
            stderr_fd=pipes.get(_stderr_pipe(child)),
            binary=None,
        )
        for epoch, child, config in found
    ]
    return Handover(
        generations=records,
        requests={},
        recovery={},
        lineage={"serving": records[-1].config},
        probation=None,
        timers={},
        binary=None,
        reference=None,
        inherited=_inherited_listeners(listeners),
        from_version="unknown (the hand-over was unreadable)",
        notes=[f"rebuilt from /proc; lost: {LOST}"],
    )


def _snapshot_sha(config: str | None) -> str | None:
    """A `-c` that names a snapshot (`generations/<sha256>.<suffix>`) names its hash."""
    if config is None:
        return None
    path = Path(config)
    stem = path.stem
    if path.parent.name == "generations" and len(stem) == 64:
        return stem
    return None


def _stderr_pipe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/2")
    except OSError:
        return None


def _our_pipes() -> dict[str | None, int]:
    """Our inherited read ends of pipes, by the pipe's identity (`pipe:[inode]`)."""
    pipes: dict[str | None, int] = {}
    for name in os.listdir("/proc/self/fd"):
        if int(name) <= 2:
            continue  # our own stdio: never a child's pipe to us
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("pipe:"):
            pipes[target] = int(name)
    return pipes


def _inherited_listeners(listeners: Listeners) -> dict[str, int]:
    """Our socket fds that are the control socket and the status listener, matched by
    inode against the kernel's tables (/proc/net/unix, /proc/net/tcp{,6})."""
    sockets = _our_sockets()
    found: dict[str, int] = {}
    if listeners.control is not None:
        inode = _unix_inode(str(listeners.control))
        if inode in sockets:
            found["control"] = sockets[inode]
    if listeners.status is not None:
        inode = _tcp_listen_inode(listeners.status[1])
        if inode in sockets:
            found["status"] = sockets[inode]
    return found


def _our_sockets() -> dict[str, int]:
    sockets: dict[str, int] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            sockets[target[len("socket:[") : -1]] = int(name)
    return sockets


def _unix_inode(path: str) -> str | None:
    """/proc/net/unix: `Num RefCount Protocol Flags Type St Inode Path`."""
    for fields in _table("/proc/net/unix"):
        if len(fields) >= 8 and fields[7] == path:
            return fields[6]
    return None


def _tcp_listen_inode(port: int) -> str | None:
    """/proc/net/tcp{,6}: local address `HEX:PORT`, state 0A (LISTEN), inode field 9."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for fields in _table(table):
            if len(fields) > 9 and fields[3] == "0A" and fields[1].endswith(f":{port:04X}"):
                return fields[9]
    return None


def _table(path: str) -> list[list[str]]:
    try:
        lines = Path(path).read_text().splitlines()[1:]
    except OSError:
        return []
    return [line.split() for line in lines]
