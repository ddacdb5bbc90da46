"""Re-executing the daemon in place: SIGUSR2 or `envoy-autoreloadctl reexec`.

Envoy dies with its parent (ENVOY_FACTS §11), so stopping the daemon stops Envoy; an
`execve` of the same PID does not (docs/FACTS-reexec.md: the parent-death signal fires
when the spawning thread ends, and exec from the main thread ends none). So the daemon
becomes a new image of itself, whatever code is installed now, and the new image adopts
the running family (`adoption.py`). HAProxy's master re-executes itself the same way.

The steps, each refusable with one line and the old image carrying on:
1. wait for a quiet moment (nothing starting, validating, planned or queued: nothing
   in flight has to cross the exec);
2. run the new image's self-test in a child (`python -m envoy_autoreload --self-test
   ARGV`: imports, argument parsing, settings) without blocking the loop;
3. hand the state over in a memfd, make the children's stderr pipes and our sockets
   inheritable, block every signal we handle (a SIGHUP or SIGTERM in the window stays
   pending and is handled by the new image once its handlers are in), and exec.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Hashable
from typing import Final

from envoy_autoreload import HANDOVER_FD_VARIABLE
from envoy_autoreload.adoption import CoreParts, export_state
from envoy_autoreload.command import CommandResult, RunningCommand
from envoy_autoreload.control import ControlConnection, ControlReply
from envoy_autoreload.handover import Handover, write_memfd
from envoy_autoreload.logs import flush_logs, log_event
from envoy_autoreload.notify import Notifier
from envoy_autoreload.planner import Planner
from envoy_autoreload.signal_mask import SIGNAL_PRIORITY
from envoy_autoreload.states import GenerationState, Timer
from envoy_autoreload.telemetry import brief_error

logger = logging.getLogger(__name__)

SELF_TEST_TIMEOUT_S: Final = 60.0
# Blocked across the exec; the new image's reactor unblocks them once it handles them.
BLOCKED_ACROSS_EXEC: Final = frozenset(SIGNAL_PRIORITY)
HANDED_OVER: Final = frozenset({GenerationState.SERVING, GenerationState.DRAINING})


def image_argv() -> list[str]:
    """How this image was started: the interpreter's own argv (a console script or
    `python -m`), so the new image starts the same way with whatever is installed now."""
    return list(sys.orig_argv)


class Reexec:
    def __init__(
        self,
        parts: CoreParts,
        planner: Planner,
        inherited: dict[str, int],
        notifier: Notifier,
        *,
        execs: bool = True,
    ) -> None:
        self._notifier = notifier
        self._parts = parts
        self._reactor = parts.reactor
        self._planner = planner
        self._inherited = inherited  # the control socket and status listener, if any
        self.wanted: str | None = None  # why, while a re-exec waits or is being checked
        self._passed = False  # the self-test passed; exec at the next quiet moment
        self._clients: list[ControlConnection] = []
        self._self_test: RunningCommand | None = None
        # False in the simulation: its harness performs the re-exec step itself.
        self._execs = execs

    def tick(self) -> None:
        """After each event: start the self-test, or exec, once nothing is in flight."""
        if self.wanted is None or self._self_test is not None or not self.quiet():
            return
        if not self._execs:
            return
        if self._passed:
            self._exec()
        else:
            self.begin_self_test()

    def on_sigchld(self) -> None:
        result = self.poll()
        if result is None:
            return
        failure = self_test_failure(result)
        if failure is not None:
            self.refuse(failure)
            return
        self._passed = True
        self.tick()

    def export(self) -> Handover:
        return export_state(self._parts)

    def quiet(self) -> bool:
        """Nothing that would have to cross the exec: a start, a gate command, a plan,
        a request, a retry's backoff, a recovery."""
        parts = self._parts
        roster, batches = parts.roster, parts.batches
        alive = roster.alive()
        return (
            roster.serving() is not None
            and all(g.state in HANDED_OVER for g in alive)
            and not parts.gatekeeper.gate.busy
            and self._planner.plan is None
            and not batches.queued
            and not batches.in_flight
            and not self._reactor.has_deadline(Timer.RETRY)
            and not roster.reference_pending  # the first hashing of the files runs
        )

    def _exec(self) -> None:
        handover = self.export()
        clients = [conn.fileno() for conn in self._clients]
        handover = dataclasses.replace(handover, waiting_clients=clients, inherited=self._inherited)
        # A standby (standby.py) would outlive the exec as a child nobody knows: gone,
        # before the pipes are emptied (its reaping may wait a moment).
        self._parts.roster.processes().release()
        for gen in self._parts.roster.alive():
            # Envoy blocks writing to a full pipe: empty each before the blind window
            # (docs/FACTS-reexec.md R4).
            self._parts.launcher.pump_output(gen)
        stderr = [g.stderr_fd for g in handover.generations if g.stderr_fd is not None]
        # Nothing runs for the gate (`quiet`), but a check started ahead of a burst may
        # (check_ahead.py): killed and reaped, the new image checks the burst afresh.
        self._parts.gatekeeper.gate.abandon()
        self._passed = False
        self.exec_now(handover, [*stderr, *self._inherited.values(), *clients])

    @property
    def testing(self) -> bool:
        return self._self_test is not None

    def request(self, reason: str, conn: ControlConnection | None = None) -> None:
        if conn is not None:
            self._clients.append(conn)
        if self.wanted is None:
            self.wanted = reason
            log_event(
                logger,
                logging.INFO,
                "reexec.requested",
                "re-executing the daemon in place once nothing is in flight",
                reason=reason,
            )

    def begin_self_test(self) -> None:
        """The new image's own check of our argv, in a child, watched by the loop."""
        argv = [sys.executable, "-m", "envoy_autoreload", "--self-test", *image_argv_args()]
        try:
            command = RunningCommand(argv, SELF_TEST_TIMEOUT_S)
        except OSError as err:
            self.refuse(f"cannot run the self-test: {err.strerror or err}")
            return
        self._self_test = command
        for fd in command.open_fds():
            self._reactor.add_reader(fd, command)
        self._reactor.set_deadline(Timer.SELF_TEST_DEADLINE, command.deadline)

    def owns(self, key: Hashable) -> bool:
        return key is not None and key is self._self_test

    def on_output(self, key: Hashable) -> None:
        command = self._self_test
        if command is None or key is not command:
            return
        for fd in command.open_fds():
            if not command.pump(fd):
                self._reactor.remove_reader(fd)

    def on_deadline(self) -> None:
        if self._self_test is not None:
            self._self_test.kill()

    def poll(self) -> CommandResult | None:
        """On SIGCHLD: the self-test's result once it exited."""
        command = self._self_test
        if command is None:
            return None
        result = command.result()
        if result is None:
            return None
        for fd in command.all_fds():
            self._reactor.remove_reader(fd)
        self._reactor.cancel(Timer.SELF_TEST_DEADLINE)
        command.close()
        self._self_test = None
        return result

    def child_pids(self) -> set[int]:
        return {self._self_test.pid} if self._self_test is not None else set()

    def refuse(self, why: str) -> None:
        """The old image stays in charge; whoever asked hears why."""
        log_event(
            logger, logging.ERROR, "reexec.refused", f"{why}; the daemon carries on as it was"
        )
        self._answer(ControlReply(False, f"re-exec refused: {why}"))
        self.wanted = None
        self._passed = False

    def abandon(self) -> None:
        """Stopping: no re-exec; a running self-test is killed and reaped."""
        command = self._self_test
        if command is not None:
            for fd in command.all_fds():
                self._reactor.remove_reader(fd)
            command.abandon()
            self._self_test = None
        if self.wanted is not None:
            self._answer(ControlReply(False, "the daemon is stopping"))
            self.wanted = None

    def exec_now(self, handover: Handover, inherit: list[int]) -> None:
        """Become the new image. Returns only when `execve` failed (logged, refused).

        Signals are blocked first: from here on a SIGHUP or SIGTERM stays pending in the
        kernel and survives the exec. One this image already took in but did not handle
        yet (the reactor's pending set) is raised again, blocked, for the same reason:
        handled here it would be lost with this image (CI caught a SIGHUP lost so)."""
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED_ACROSS_EXEC)
        fd = write_memfd(handover)
        log_event(
            logger,
            logging.INFO,
            "daemon.reexec",
            "handing over to a new image of the daemon; Envoy keeps serving",
            epochs=[g.epoch for g in handover.generations],
            pids=[g.pid for g in handover.generations],
        )
        # systemd: reloading until the new image says READY=1 (with its MAINPID, ours).
        self._notifier.reloading("re-executing envoy-autoreload; Envoy keeps serving")
        flush_logs()
        for number in inherit:
            os.set_inheritable(number, True)
        for signum in self._reactor.take_pending():
            os.kill(os.getpid(), signum)  # blocked: pending until the new image's handler
        env = {**os.environ, HANDOVER_FD_VARIABLE: str(fd)}
        try:
            os.execve(sys.executable, image_argv(), env)
        except OSError as err:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # delivered here again
            with contextlib.suppress(OSError):
                os.close(fd)
            for number in inherit:
                with contextlib.suppress(OSError):
                    os.set_inheritable(number, False)
            self.refuse(f"execve failed: {err.strerror or err}")

    def _answer(self, reply: ControlReply) -> None:
        clients, self._clients = self._clients, []
        for conn in clients:
            conn.reply(reply)


def image_argv_args() -> list[str]:
    """Our own arguments, without the interpreter and the program that took them."""
    return list(sys.argv[1:])


def self_test_failure(result: CommandResult) -> str | None:
    """Why the self-test failed, in one line; None when it passed."""
    if result.returncode == 0:
        return None
    if result.timed_out:
        return f"the new image's self-test did not finish within {SELF_TEST_TIMEOUT_S:g} s"
    lines = [line for line in result.output.splitlines() if line.strip()]
    last = brief_error(lines[-1]) if lines else None
    return f"the new image's self-test failed: {last or f'exit status {result.returncode}'}"
