"""The generations we own: who is alive, in which state, and what we know of each.

The only writer of a generation's state and marks (`states.py`), and the one place that
logs their lifecycle lines (`child.started`, `child.draining`, `child.serving`). The
supervisor decides; the roster records, so "which one serves" can never disagree between
two lists. Processes come in through the `Processes` port: the simulation's are models.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from envoy_autoreload.digest import Snapshot
from envoy_autoreload.envoy_binary import BinaryInfo
from envoy_autoreload.envoy_process import EnvoyProcess
from envoy_autoreload.generations import ConfigGeneration
from envoy_autoreload.logs import log_event
from envoy_autoreload.ports import ChildProcess, Processes, Reactor
from envoy_autoreload.states import (
    ALIVE,
    ALLOWED_TRANSITIONS,
    GenerationState,
    IllegalMove,
    Marks,
)

logger = logging.getLogger(__name__)

MAX_FAMILY_PROCESSES: Final = 3  # epochs share domain sockets modulo 3 (§0, §4)


@dataclass(eq=False)
class Generation:
    """A child process at one restart epoch."""

    epoch: int
    process: ChildProcess
    reason: str
    started_at: float  # the reactor's clock
    state: GenerationState = GenerationState.STARTING
    marks: Marks = field(default_factory=Marks)
    serving_at: float | None = None
    draining_since: float | None = None
    envoy: EnvoyProcess | None = None  # the Envoy behind it, once it exec'd
    envoy_seen_at: float | None = None  # when it was first found (monotonic)
    saw_initializing: bool = False  # a probe saw its Envoy set the hot-restart flag
    snapshot: Snapshot | None = None  # the content it started from, when watching
    awaiting_reference: bool = False  # started while the files were first read
    binary: BinaryInfo | None = None
    covers_seq: int = 0  # restart requests this generation answers (0: none)
    config: ConfigGeneration | None = None  # the snapshot it started (generations on)
    retries_failed: bool = False  # its bytes had failed probation when it started

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def stderr_tail(self) -> Sequence[str]:
        return self.process.stderr_tail

    def is_alive(self) -> bool:
        return self.state in ALIVE

    def last_error_line(self) -> str | None:
        return self.process.last_error_line()

    @property
    def config_short(self) -> str | None:
        """Its config generation's short hash, for every log line about it."""
        return self.config.short if self.config is not None else None


class Roster:
    def __init__(self, processes: Processes, reactor: Reactor) -> None:
        self._processes = processes
        self._reactor = reactor
        self._generations: list[Generation] = []
        # The content the newest start carried, failed or not: a missing path counts
        # from it when nothing serves (see `MissingPaths.hold`).
        self.last_started_content: Snapshot | None = None
        # The first hashing of the watched files runs (watch/build.py): a start now
        # gets what it started from once that is done (`attach_reference`).
        self.reference_pending = False

    def attach_reference(self, reference: Snapshot) -> None:
        """The content generations started while the files were first read started
        from, with every path changed meanwhile UNKNOWN (never equal to the files)."""
        self.reference_pending = False
        for gen in self._generations:
            if gen.awaiting_reference:
                gen.awaiting_reference = False
                gen.snapshot = gen.snapshot or reference
        if self.last_started_content is None:
            self.last_started_content = reference

    # -- queries ----------------------------------------------------------------
    def alive(self) -> list[Generation]:
        return [g for g in self._generations if g.is_alive()]

    def in_state(self, state: GenerationState) -> list[Generation]:
        return [g for g in self._generations if g.state is state]

    def serving(self) -> Generation | None:
        serving = self.in_state(GenerationState.SERVING)
        return serving[-1] if serving else None

    def starting(self) -> Generation | None:
        starting = self.in_state(GenerationState.STARTING)
        return starting[-1] if starting else None

    def draining(self) -> list[Generation]:
        return self.in_state(GenerationState.DRAINING)

    def socket_taken(self, serving: Generation) -> bool:
        """Whether the next epoch cannot start yet: three of the family are alive, or an
        older epoch still holds the domain socket the next one needs (mod 3, §0, §4)."""
        alive = self.alive()
        slot = (serving.epoch + 1) % 3
        held = any(g is not serving and g.epoch % 3 == slot for g in alive)
        return held or len(alive) >= MAX_FAMILY_PROCESSES

    # -- lifecycle ----------------------------------------------------------------
    def spawn(
        self,
        epoch: int,
        reason: str,
        *,
        covers_seq: int,
        snapshot: Snapshot | None,
        binary: BinaryInfo | None,
        config: ConfigGeneration | None = None,
        awaiting_reference: bool = False,
        retries_failed: bool = False,
    ) -> Generation:
        """Start the script at `epoch`; raises OSError when it cannot be executed."""
        if self.starting() is not None:
            raise IllegalMove("never two starting generations (upstream #550)")
        ahead = self._processes.started_ahead(epoch)
        process = self._processes.spawn(epoch, config.path if config is not None else None)
        spawned_at = process.spawned_at if ahead else None  # epoch 0 at start-up: 0.1 s ago
        gen = Generation(
            epoch=epoch,
            process=process,
            reason=reason,
            started_at=spawned_at if spawned_at is not None else self._reactor.now(),
            snapshot=snapshot,
            binary=binary,
            covers_seq=covers_seq,
            config=config,
            awaiting_reference=awaiting_reference,
            retries_failed=retries_failed,
        )
        self._generations.append(gen)
        if snapshot is not None:
            self.last_started_content = snapshot
        log_event(
            logger,
            logging.INFO,
            "child.started",
            epoch=epoch,
            pid=gen.pid,
            reason=reason,
            config=config.short if config is not None else None,
            ahead=ahead,  # fired at the burst's deadline (`ready_start.py`), or head_start.py
        )
        return gen

    def adopt(self, gen: Generation) -> None:
        """A generation the previous image of the daemon ran (re-exec in place): taken
        over in the state it had, not started."""
        if gen.state not in (GenerationState.SERVING, GenerationState.DRAINING):
            raise IllegalMove(f"only serving and draining generations are handed over: {gen}")
        self._generations.append(gen)

    def processes(self) -> Processes:
        return self._processes

    def went_live(self, gen: Generation) -> None:
        """`gen` reported LIVE: the one it replaces drains (Envoy ends it, §2)."""
        now = self._reactor.now()
        for old in self.in_state(GenerationState.SERVING):
            _move(old, GenerationState.DRAINING)
            log_event(
                logger,
                logging.INFO,
                "child.draining",
                f"epoch {old.epoch} drains; Envoy ends it after its parent-shutdown time",
                epoch=old.epoch,
                pid=old.pid,
                config=old.config_short,
                successor_epoch=gen.epoch,
            )
        for parent in self.draining():
            if parent.epoch == gen.epoch - 1:
                # Envoy ends the parent's drain at the child's real LIVE + parent-shutdown
                # time; the child's spawn is a lower bound we know for sure.
                parent.draining_since = gen.started_at
        _move(gen, GenerationState.SERVING)
        gen.serving_at = now
        log_event(
            logger,
            logging.INFO,
            "child.serving",
            epoch=gen.epoch,
            pid=gen.pid,
            config=gen.config_short,
            startup_s=round(now - gen.started_at, 3),
            reason=gen.reason,
        )

    def stranded(self, parent: Generation, successor: Generation) -> None:
        """`successor` took over unseen and died: `parent` drains since its spawn."""
        _move(parent, GenerationState.DRAINING)
        parent.draining_since = successor.started_at
        log_event(
            logger,
            logging.INFO,
            "child.draining",
            f"epoch {parent.epoch} drains: its successor took over, then died",
            epoch=parent.epoch,
            pid=parent.pid,
            config=parent.config_short,
            successor_epoch=successor.epoch,
        )

    def exited(self, gen: Generation) -> GenerationState:
        """It was reaped: forget it; returns the state it was in."""
        previous = _move(gen, GenerationState.EXITED)
        self._generations.remove(gen)
        return previous

    # -- marks ----------------------------------------------------------------------
    @staticmethod
    def mark_stopping(gen: Generation, reason: str) -> None:
        gen.marks.stop_reason = reason

    @staticmethod
    def mark_terminated(gen: Generation) -> None:
        gen.marks.terminated = True

    @staticmethod
    def mark_doomed(gen: Generation) -> None:
        gen.marks.doomed = True

    @staticmethod
    def mark_drain_cut(gen: Generation) -> None:
        gen.marks.drain_cut_by_restart = True

    @staticmethod
    def owe_sigusr1(gen: Generation, owed: bool) -> None:
        gen.marks.owes_sigusr1 = owed


def _move(gen: Generation, new: GenerationState) -> GenerationState:
    old = gen.state
    if new not in ALLOWED_TRANSITIONS[old]:
        raise IllegalMove(f"generation {gen.epoch}: {old.value} -> {new.value} not allowed")
    gen.state = new
    return old
