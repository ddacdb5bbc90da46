"""What the daemon imports before its start-up check starts: Envoy's first start waits
for all of it (issue 16, goal 1), so the rest of the daemon comes after the spawn."""

from __future__ import annotations

import subprocess
import sys

# Each costs milliseconds that epoch 0 would wait for, and none is needed to parse the
# command line, pin the config or launch `envoy --mode validate`.
NOT_BEFORE_THE_CHECK = (
    "envoy_autoreload.supervisor",
    "envoy_autoreload.loop",  # and `socket` with it
    "envoy_autoreload.handover",  # only a re-exec reads one
    "envoy_autoreload.watch",
    "envoy_autoreload.telemetry",
    "logging.handlers",  # with `socket` and `pickle`: the turn buffer comes at the first turn
    "socket",
    "pickle",
)


def test_what_start_up_imports_before_the_check_leaves_the_daemon_for_after_the_spawn() -> None:
    probe = (
        "import sys, envoy_autoreload.cli, envoy_autoreload.head_start;"
        f"print(' '.join(m for m in {NOT_BEFORE_THE_CHECK!r} if m in sys.modules))"
    )
    imported = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert imported == [], f"imported before the start-up check: {imported}"
