"""The LIVE probe's `/server_info` request, made on a short-lived thread and waited for
only briefly, so that an Envoy slow to answer never holds the event loop.

A starting Envoy accepts connections on its admin port while its main thread still
loads the config, and answers only once it is loaded: a 5 MB config kept a request
waiting about a second, and `admin.fetch_server_info` blocks up to its 0.5 s timeout.
Made on the loop, each probe then stalled it for 350 ms (measured, issue 16). Here the
request runs on a thread of its own and the probe does not wait for it: it says "not
LIVE yet", and the answer rings a pipe the loop watches (`fileno`), which probes again
at once (supervisor.py). It used to wait up to 20 ms in the hope of an answer within the
turn; on a 2-vCPU VM with Envoy loading a 5 MB config on both cores, that wait held the
loop 60 ms (issue 16, goal 5). Without the pipe (a family used on its own) the next probe
(10-100 ms later, launcher.py) takes the answer. An answer is taken once: each later
probe asks again over a fresh connection (ENVOY_FACTS §9).

One request at a time. A thread per request, not a resident one: probes happen only
while an epoch starts, and an idle daemon keeps no thread and no wakeup. The thread only
does socket I/O; it never spawns a process (§11), and it starts with our signals
blocked (`signal_mask.signals_blocked`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Final

from envoy_autoreload.addresses import AdminAddress
from envoy_autoreload.admin import ServerInfo, fetch_live_state
from envoy_autoreload.signal_mask import signals_blocked

WAIT_S: Final = 0.0  # the most one probe holds the loop for an answer: the pipe rings

Fetch = Callable[[AdminAddress], ServerInfo | None]


@dataclass
class _Request:
    key: Hashable
    done: threading.Event = field(default_factory=threading.Event)
    info: ServerInfo | None = None


class ServerInfoAsker:
    """`/server_info` for the LIVE probe, off the loop (see the module's notes)."""

    def __init__(self, fetch: Fetch = fetch_live_state, wait_s: float = WAIT_S) -> None:
        self._fetch = fetch
        self._wait_s = wait_s
        self._lock = threading.Lock()
        self._request: _Request | None = None
        self._bell: tuple[int, int] | None = None  # (read, write) once the loop watches

    def fileno(self) -> int:
        """A pipe that is readable once an answer came: the loop's cue to probe again."""
        if self._bell is None:
            self._bell = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        return self._bell[0]

    def drain(self) -> None:
        """Empty the pipe: its rings were taken."""
        if self._bell is not None:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._bell[0], 512):
                    pass

    def close(self) -> None:
        with self._lock:
            bell, self._bell = self._bell, None
        for fd in bell or ():
            os.close(fd)

    def ask(self, key: Hashable, address: AdminAddress) -> tuple[bool, ServerInfo | None]:
        """(answered, what it said) for the generation `key` names, asked at `address`.
        Not answered: still asking (this one or another generation's request)."""
        with self._lock:
            request = self._request
            if request is not None and request.key != key and request.done.is_set():
                request = None  # an answer no probe will take: its generation is gone
            if request is None:
                request = self._request = _Request(key)
                worker = threading.Thread(
                    target=self._run,
                    args=(request, address),
                    name="envoy-autoreload-live-probe",
                    daemon=True,
                )
                with signals_blocked():
                    worker.start()
        if request.key != key or not request.done.wait(self._wait_s):
            return False, None
        with self._lock:
            if self._request is request:
                self._request = None  # taken: the next probe asks afresh
        return True, request.info

    def _run(self, request: _Request, address: AdminAddress) -> None:
        try:
            request.info = self._fetch(address)
        finally:
            with self._lock:  # not into a descriptor `close` freed for another file
                request.done.set()
                if self._bell is not None:
                    with contextlib.suppress(BlockingIOError):  # full: rung already
                        os.write(self._bell[1], b"\0")
