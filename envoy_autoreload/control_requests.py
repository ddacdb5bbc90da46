"""What the control socket is asked: `status` is answered at once; `reload` once the
batch that carries it is over (the truthful reload), or at once when the content on
disk is what already serves. The socket and its clients are `control.py`'s.
"""

from __future__ import annotations

from typing import Protocol

from envoy_autoreload.batches import Batches
from envoy_autoreload.control import ControlConnection, ControlDesk, ControlReply
from envoy_autoreload.states import SupervisorState


class Hooks(Protocol):
    @property
    def stopping(self) -> bool: ...
    @property
    def state(self) -> SupervisorState: ...
    def status_snapshot(self) -> dict[str, object]: ...
    def unchanged_reply(self) -> ControlReply | None: ...
    def request_restart(
        self, reason: str, changed: list[str] | None = None, events: int | None = None
    ) -> int: ...


class ControlRequests:
    def __init__(self, desk: ControlDesk, batches: Batches, hooks: Hooks) -> None:
        self._desk = desk
        self._batches = batches
        self._hooks = hooks

    def on_readable(self, conn: ControlConnection) -> None:
        request = self._desk.read(conn)
        if request is None:
            return
        match request.split():
            case ["status"]:
                hooks = self._hooks
                conn.reply(ControlReply(True, hooks.state.value, status=hooks.status_snapshot()))
            case ["reload", *flags] if set(flags) <= {"--force"}:
                self._reload(conn, force=bool(flags))
            case []:
                conn.close()
            case _:
                conn.reply(ControlReply(False, f"unknown request {request!r}: reload, status"))

    def _reload(self, conn: ControlConnection, *, force: bool) -> None:
        if self._hooks.stopping:
            conn.reply(ControlReply(False, "the daemon is stopping"))
            return
        answer = None if force else self._hooks.unchanged_reply()
        if answer is not None:
            conn.reply(answer)
            return
        seq = self._hooks.request_restart("control --force" if force else "control")
        self._batches.wait(seq, conn)
