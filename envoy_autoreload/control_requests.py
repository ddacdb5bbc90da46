"""What the control socket is asked: `status` and `history` are answered at once;
`reload` and `rollback` once the batch that carries them is over (the truthful reload),
or at once when the content on disk is what already serves. The socket and its clients
are `control.py`'s.
"""

from __future__ import annotations

from typing import Protocol

from envoy_autoreload.batches import Batches
from envoy_autoreload.control import ControlConnection, ControlDesk, ControlReply
from envoy_autoreload.ports import Gate
from envoy_autoreload.reexec import Reexec
from envoy_autoreload.rollbacks import Rollbacks
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
    def __init__(
        self,
        desk: ControlDesk,
        batches: Batches,
        hooks: Hooks,
        rollbacks: Rollbacks,
        gate: Gate,
        reexec: Reexec,
    ) -> None:
        self._reexec = reexec
        self._desk = desk
        self._batches = batches
        self._hooks = hooks
        self._rollbacks = rollbacks
        self._gate = gate

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
            case ["history"]:
                history: dict[str, object] = {"generations": self._rollbacks.history()}
                conn.reply(ControlReply(True, "history", status=history))
            case ["reexec"]:
                if self._hooks.stopping:
                    conn.reply(ControlReply(False, "the daemon is stopping"))
                else:
                    self._reexec.request("control", conn)
            case ["rollback", *prefix] if len(prefix) <= 1:
                self._rollback(conn, prefix[0] if prefix else None)
            case []:
                conn.close()
            case _:
                conn.reply(
                    ControlReply(
                        False,
                        f"unknown request {request!r}: reload, status, history, rollback, reexec",
                    )
                )

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

    def _rollback(self, conn: ControlConnection, prefix: str | None) -> None:
        if self._hooks.stopping:
            conn.reply(ControlReply(False, "the daemon is stopping"))
            return
        answer = self._rollbacks.manual(prefix, self._batches, self._gate.busy)
        if isinstance(answer, ControlReply):
            conn.reply(answer)
            return
        self._batches.wait(answer, conn)
