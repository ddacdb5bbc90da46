"""inotify limits: what binds, what this run needs, what the same user already holds, and
the exact line that raises the limit.

Two sets of limits apply at once: the global sysctls `fs.inotify.max_user_watches` and
`max_user_instances`, and the per-user-namespace ones in `/proc/sys/user/` (inside a
container's user namespace those bind, and are set from outside it). The smaller wins.
Watches are counted per user across all their processes, so an IDE or a file-sync
daemon of the same user can exhaust them: we count what is held from `/proc/*/fdinfo`
(one `inotify wd:` line per watch) where readable.

ENOSPC from inotify_add_watch and EMFILE from inotify_init become a one-line
`WatchLimitError` with the numbers and the fix, never a traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from envoy_autoreload.errors import WatchLimitError

SYSCTL_CONF: Final = "/etc/sysctl.d/60-envoy-autoreload.conf"
HEADROOM: Final = 0.10
LimitKind = Literal["watches", "instances"]


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def suggested_limit(need: int, current: int | None) -> int:
    """A power of two comfortably above the need (twice it) and the current value."""
    floor = max(need * 2, (current or 0) + 1, 8192)
    target = 1
    while target < floor:
        target *= 2
    return target


@dataclass(frozen=True, slots=True)
class Limit:
    """The limit that binds for one kind: its value and the sysctl that sets it."""

    kind: LimitKind
    value: int | None
    sysctl: str
    set_outside_container: bool

    def fix(self, need: int) -> str:
        target = suggested_limit(need, self.value)
        where = (
            " (a user namespace's limit: set it on the host, outside the container)"
            if self.set_outside_container
            else ""
        )
        return (
            f"sysctl -w {self.sysctl}={target} now, and {self.sysctl}={target} in "
            f"{SYSCTL_CONF} to keep it{where}"
        )


def binding_limit(kind: LimitKind, proc: Path = Path("/proc")) -> Limit:
    """The smaller of the global and the user-namespace limit."""
    global_value = _read_int(proc / "sys/fs/inotify" / f"max_user_{kind}")
    namespace_value = _read_int(proc / "sys/user" / f"max_inotify_{kind}")
    if namespace_value is not None and (global_value is None or namespace_value < global_value):
        return Limit(kind, namespace_value, f"user.max_inotify_{kind}", True)
    return Limit(kind, global_value, f"fs.inotify.max_user_{kind}", False)


@dataclass(frozen=True, slots=True)
class Usage:
    """inotify instances and watches held by one user's processes we could read."""

    instances: int
    watches: int


def inotify_usage(uid: int | None = None, proc: Path = Path("/proc")) -> Usage:
    uid = os.getuid() if uid is None else uid
    instances = watches = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue  # gone, or not ours to read
        for fd in fds:
            try:
                if os.readlink(fd) != "anon_inode:inotify":
                    continue
                info = (entry / "fdinfo" / fd.name).read_text()
            except OSError:
                continue
            instances += 1
            watches += sum(1 for line in info.splitlines() if line.startswith("inotify wd:"))
    return Usage(instances, watches)


@dataclass(frozen=True, slots=True)
class LimitCheck:
    limit: Limit
    need: int
    used: int

    @property
    def ok(self) -> bool:
        """Fits with at least 10% of the limit to spare (unknown limits pass)."""
        if self.limit.value is None:
            return True
        return self.need + self.used <= self.limit.value * (1 - HEADROOM)

    def describe(self) -> str:
        return (
            f"inotify {self.limit.kind}: this run needs {self.need}, the user already holds "
            f"{self.used}, the limit is {self.limit.value} ({self.limit.sysctl})"
        )

    def advice(self) -> str:
        return f"{self.describe()}: {self.limit.fix(self.need + self.used)}"


def check_limits(need_watches: int, usage: Usage | None = None) -> tuple[LimitCheck, LimitCheck]:
    usage = inotify_usage() if usage is None else usage
    return (
        LimitCheck(binding_limit("watches"), need_watches, usage.watches),
        LimitCheck(binding_limit("instances"), 1, usage.instances),
    )


def watch_limit_message(path: Path, held: int) -> str:
    limit = binding_limit("watches")
    return (
        f"inotify watch limit reached adding a watch on {path} (this daemon holds {held}, "
        f"{limit.sysctl}={limit.value}): {limit.fix(held + 1)}"
    )


def instance_limit_error(err: OSError) -> WatchLimitError:
    limit = binding_limit("instances")
    return WatchLimitError(
        f"inotify instance limit reached ({limit.sysctl}={limit.value}): {limit.fix(1)}"
    )
