"""What a running Envoy tells us about itself through /proc: its binary and its flags.

The daemon only knows the start script; the facts it needs to supervise hot restarts
(base id for the shared memory, config path for the admin address, parent shutdown
time) are on Envoy's own command line. Reading them from `/proc/PID/cmdline` means a
drop-in run with no options still finds them, whatever the script computed.

Linux only: elsewhere every lookup answers "unknown" and the supervisor falls back to
what the command line gave it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

SHELLS: Final = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash", "busybox", "mksh"})

# Flags whose value we read; Envoy (TCLAP) accepts both `--flag value` and `--flag=value`.
_VALUE_FLAGS: Final = frozenset(
    {
        "--base-id",
        "--base-id-path",
        "-c",
        "--config-path",
        "--admin-address-path",
        "--restart-epoch",
        "--parent-shutdown-time-s",
        "--drain-time-s",
        *(
            "--config-yaml",
            "--service-node",
            "--service-cluster",
            "--service-zone",
        ),
    }
)
# Flags that change what the config means: validation of a snapshot passes them too, or it
# validates something other than what starts (a --config-yaml overlay, a node id).
CONFIG_FLAGS: Final = ("--config-yaml", "--service-node", "--service-cluster", "--service-zone")


@dataclass(frozen=True, slots=True)
class EnvoyCommandLine:
    """The Envoy flags the supervisor cares about; None where the flag was not given."""

    base_id: int | None = None
    base_id_path: str | None = None
    use_dynamic_base_id: bool = False
    config_path: str | None = None
    admin_address_path: str | None = None
    restart_epoch: int | None = None
    parent_shutdown_time_s: float | None = None
    drain_time_s: float | None = None
    config_flags: tuple[str, ...] = ()  # CONFIG_FLAGS as given, each followed by its value


@dataclass(frozen=True, slots=True)
class EnvoyProcess:
    """An Envoy found at or below a generation's PID."""

    pid: int
    exe: str
    cwd: str | None
    command_line: EnvoyCommandLine

    def resolve(self, path: str) -> Path:
        """A path from Envoy's command line, relative to Envoy's own working directory."""
        candidate = Path(path)
        if candidate.is_absolute() or self.cwd is None:
            return candidate
        return Path(self.cwd) / candidate


def _to_int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _to_float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def parse_envoy_argv(argv: list[str]) -> EnvoyCommandLine:
    """Pick the supervisor-relevant flags out of an Envoy argv (argv[0] included or not)."""
    values: dict[str, str] = {}
    flags: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        if eq and name in _VALUE_FLAGS:
            values[name] = inline
        elif arg in _VALUE_FLAGS and i + 1 < len(argv):
            values[arg] = argv[i + 1]
            i += 1
        elif arg.startswith("-"):
            flags.add(arg)
        i += 1
    return EnvoyCommandLine(
        base_id=_to_int(values.get("--base-id")),
        base_id_path=values.get("--base-id-path"),
        use_dynamic_base_id="--use-dynamic-base-id" in flags,
        config_path=values.get("--config-path", values.get("-c")),
        admin_address_path=values.get("--admin-address-path"),
        restart_epoch=_to_int(values.get("--restart-epoch")),
        parent_shutdown_time_s=_to_float(values.get("--parent-shutdown-time-s")),
        drain_time_s=_to_float(values.get("--drain-time-s")),
        config_flags=tuple(
            part for flag in CONFIG_FLAGS if flag in values for part in (flag, values[flag])
        ),
    )


def _read_argv(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def executable_of(pid: int) -> str | None:
    """The binary a PID runs now (after any exec), or None if it is gone or unreadable."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


INTERPRETERS: Final = ("python", "perl", "ruby", "node", "env", "tini", "dumb-init")
# What the kernel appends to /proc/PID/exe once the binary was replaced on disk: the
# normal state of a serving Envoy during a binary upgrade.
_DELETED: Final = " (deleted)"


def looks_like_envoy(exe: str, argv: list[str], expected_exe: Path | None = None) -> bool:
    """An `envoy*` binary, the Envoy binary the daemon was told about (`--envoy`), or a
    binary (not a shell or an interpreter) given `--restart-epoch`, which only Envoy takes.

    A `-c` alone proves nothing: `curl -c jar`, `jq -c`, `wc -c`, `head -c`, `su -c` and
    `flock -c` all run in start scripts before `exec envoy`, and taking one for Envoy
    gives the wrong base id and parent-shutdown time for the generation's whole life.
    """
    exe = exe.removesuffix(_DELETED)
    name = os.path.basename(exe)
    if name.startswith("envoy"):
        return True
    if expected_exe is not None and exe == os.path.realpath(expected_exe):
        return True
    if is_shell(exe) or name.startswith(INTERPRETERS):
        return False  # e.g. the PyPI wrapper's python before it execs the real binary
    return any(arg == "--restart-epoch" or arg.startswith("--restart-epoch=") for arg in argv[1:])


def is_shell(exe: str) -> bool:
    return os.path.basename(exe) in SHELLS


def live_group_members(pgid: int) -> list[int]:
    """PIDs in process group `pgid` that have not exited (a zombie has: it only waits to
    be reaped)."""
    members: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _children_of(pid: int) -> list[int]:
    children: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        children.extend(int(c) for c in text.split())
    return children


def find_envoy(
    pid: int, max_depth: int = 3, expected_exe: Path | None = None
) -> EnvoyProcess | None:
    """The Envoy process started by a generation: the PID itself after `exec envoy`, or,
    when the start script did not exec, the first Envoy among its descendants.
    `expected_exe` (the `--envoy` binary) also counts as Envoy whatever its name."""
    frontier = [pid]
    for _ in range(max_depth + 1):
        next_frontier: list[int] = []
        for candidate in frontier:
            exe = executable_of(candidate)
            argv = _read_argv(candidate) if exe is not None else None
            if exe is not None and argv is not None and looks_like_envoy(exe, argv, expected_exe):
                if not argv:
                    # Mid-execve, /proc shows the new exe before the new cmdline: ask again.
                    return None
                try:
                    cwd: str | None = os.readlink(f"/proc/{candidate}/cwd")
                except OSError:
                    cwd = None
                return EnvoyProcess(candidate, exe, cwd, parse_envoy_argv(argv[1:]))
            next_frontier.extend(_children_of(candidate))
        frontier = next_frontier
        if not frontier:
            return None
    return None
