"""inotify limits: what binds, and the exact line that raises it.

Two sets of limits apply at once: the global sysctls `fs.inotify.max_user_watches` /
`max_user_instances`, and the per-user-namespace ones in `/proc/sys/user/` (inside a
container's user namespace those are what bind; they are set from outside it). The
smaller wins. ENOSPC from inotify_add_watch and EMFILE from inotify_init both become a
one-line `WatchLimitError` naming the numbers and the fix, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from envoy_autoreload.errors import WatchLimitError

SYSCTL_CONF: Final = "/etc/sysctl.d/60-envoy-autoreload.conf"


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class Limit:
    """One binding limit: its value and the sysctl that sets it."""

    value: int | None
    sysctl: str
    set_outside_container: bool

    def fix(self, need: int) -> str:
        target = suggested_limit(need, self.value)
        line = f"sysctl -w {self.sysctl}={target}"
        keep = f"{self.sysctl}={target} in {SYSCTL_CONF}"
        where = " (on the host: a user namespace's limit is set from outside it)"
        return f"{line} now and {keep} to keep it" + (where if self.set_outside_container else "")


def suggested_limit(need: int, current: int | None) -> int:
    """A power of two comfortably above both the need and the current value."""
    floor = max(need * 2, (current or 0) + 1, 8192)
    target = 1
    while target < floor:
        target *= 2
    return target


def binding_limit(kind: str, proc: Path = Path("/proc")) -> Limit:
    """`kind` is "watches" or "instances"; the smaller of the global and namespace limit."""
    global_value = _read_int(proc / "sys/fs/inotify" / f"max_user_{kind}")
    namespace_value = _read_int(proc / "sys/user" / f"max_inotify_{kind}")
    if namespace_value is not None and (global_value is None or namespace_value < global_value):
        return Limit(namespace_value, f"user.max_inotify_{kind}", True)
    return Limit(global_value, f"fs.inotify.max_user_{kind}", False)


def watch_limit_error(path: Path, held: int, err: OSError) -> WatchLimitError:
    limit = binding_limit("watches")
    return WatchLimitError(
        f"inotify watch limit reached adding a watch on {path} (this daemon holds {held}, "
        f"{limit.sysctl}={limit.value}): {limit.fix(held + 1)}"
    )


def instance_limit_error(err: OSError) -> WatchLimitError:
    limit = binding_limit("instances")
    return WatchLimitError(
        f"inotify instance limit reached ({limit.sysctl}={limit.value}): {limit.fix(1)}"
    )
