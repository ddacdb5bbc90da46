"""Run the real daemon (`python -m envoy_autoreload`) and read its JSON log events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import wait_until

Event = dict[str, Any]


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def events(self, name: str | None = None, **match: object) -> list[Event]:
        found: list[Event] = []
        for index, line in enumerate(self.lines()):
            if not line.startswith("{"):
                continue  # Envoy's own log lines pass through our stderr
            try:
                event = json.loads(line)
            except ValueError:
                continue
            event["line"] = index  # the order events happened in, finer than ts
            if name is not None and event.get("event") != name:
                continue
            if all(event.get(k) == v for k, v in match.items()):
                found.append(event)
        return found

    def wait_event(
        self,
        name: str,
        *,
        timeout_s: float = 30.0,
        count: int = 1,
        where: Callable[[Event], bool] | None = None,
        **match: object,
    ) -> Event:
        def ready() -> Event | None:
            events = [e for e in self.events(name, **match) if where is None or where(e)]
            return events[count - 1] if len(events) >= count else None

        try:
            return wait_until(ready, timeout_s=timeout_s, what=f"event {name} {match}")
        except AssertionError as err:
            raise AssertionError(
                f"{err}\n--- daemon log ---\n" + "\n".join(self.lines()[-60:])
            ) from None

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        return self.process.wait(timeout=timeout_s)

    def stop(self) -> None:
        """Stop the daemon (and so its children) whatever state the test left it in."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for event in self.events("child.started"):
            _kill_if_ours(int(event["pid"]), self.pid)


def _kill_if_ours(pid: int, daemon_pid: int) -> None:
    """Kill a child the daemon started if it somehow outlived it (never by name)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return
    if b"RESTART_EPOCH=" in environ:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return


def assert_one_clear_line(event: Event, *needles: str) -> None:
    """The event's message is one line an operator can act on; detail goes elsewhere."""
    message = str(event["message"])
    assert "\n" not in message and "Traceback" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def run_cli(
    args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """One run of the command line to its end (start-up errors, --check, --help)."""
    return subprocess.run(
        [sys.executable, "-m", "envoy_autoreload", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        check=False,
    )


def one_error_line(stderr: str) -> str:
    """A user's mistake is one line naming it, never a traceback."""
    assert "Traceback" not in stderr
    errors = [
        line
        for line in stderr.splitlines()
        if line.startswith(("Error:", "envoy-autoreload: error:"))
    ]
    assert len(errors) == 1, stderr
    return errors[0]


def start_daemon(
    args: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    prefix: tuple[str, ...] = (),
    entry: tuple[str, ...] = ("-m", "envoy_autoreload"),
) -> Daemon:
    """`prefix` runs the daemon through a wrapper that execs it (unshare, setpriv);
    `entry` replaces `-m envoy_autoreload` (a `-c` program that patches, then runs it)."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*prefix, sys.executable, *entry, "--log-format", "json", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            # Each daemon its own control socket and state directory, never the
            # machine's default ones (history would leak from one test into the next).
            env={
                **os.environ,
                "ENVOY_AUTORELOAD_CONTROL_SOCKET": str(log_path.with_suffix(".sock")),
                "ENVOY_AUTORELOAD_STATE_DIR": str(log_path.with_suffix(".state")),
                **(env or {}),
            },
            cwd=cwd,
            start_new_session=True,
        )
    return Daemon(process, log_path)
