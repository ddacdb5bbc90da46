"""Real inotify limits without touching the machine's: a user namespace of the test's own.

Only `/proc/sys/user/max_inotify_*` is lowered, and only inside a new user namespace
(`unshare -U -r`), where that limit is the namespace's own and its count starts at 0.
The global `/proc/sys/fs/inotify/*` is never written: here that would change the whole
machine.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def _userns_ok() -> bool:
    probe = subprocess.run(["unshare", "-U", "-r", "true"], capture_output=True, check=False)
    return probe.returncode == 0


needs_userns = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _userns_ok(),
    reason="needs unprivileged user namespaces (unshare -U -r)",
)


def with_inotify_limit(limit: int, what: str = "watches") -> tuple[str, ...]:
    """A command prefix that runs the rest in a user namespace with this limit."""
    return (
        "unshare",
        "-U",
        "-r",
        "sh",
        "-c",
        f'echo {limit} > /proc/sys/user/max_inotify_{what} && exec "$0" "$@"',
    )
