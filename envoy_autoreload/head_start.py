"""Start-up before the rest of the daemon is imported: the start-up check, and epoch 0.

Before epoch 0 the daemon used to import itself (the supervisor, the metrics, the
control socket, the watcher: about 0.1 s on 2 cores) and only then spawn Envoy. Issue
16 wants Envoy serving within 0.3 s of the start, so:

- the config is pinned and the check's commands (`envoy --version`, `envoy --mode
  validate -c SNAPSHOT`) start as soon as the command line is parsed;
- the status address and the control socket are bound meanwhile (cli.py): whatever
  can refuse start-up does so before any Envoy runs;
- once the check passed, epoch 0 is spawned (`spawn_epoch_0`), and the imports, the
  supervisor and then the walk run while Envoy starts.

The verdict is unchanged: the gatekeeper's start-up check (`Gatekeeper.check_before_
first_start`) takes this snapshot (`EarlyEpoch0`) and the verdict reached on it, for the
same binary file only (`validation.decide_ahead`); the supervisor's spawn of epoch 0
takes the child spawned here for that snapshot (`ScriptSpawner.fire_first`; for any
other it is killed, and gone before another epoch 0 is spawned). Bytes that failed
probation before, a check that failed (the last good generation may start instead)
and a start without a check leave epoch 0 to the supervisor, as before.

From the spawn until the event loop takes them over, the signals it handles are
blocked: a SIGTERM in between is pending, and stops the daemon and its new Envoy the
usual way once the loop runs, as across a re-exec (reexec.py).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING

from envoy_autoreload.generations import ConfigGeneration
from envoy_autoreload.lineage import Lineage, open_lineage
from envoy_autoreload.settings import Settings
from envoy_autoreload.validation import (
    Preflight,
    commands_ahead,
    decide_ahead,
    drop_commands_ahead,
    first_check,
)

if TYPE_CHECKING:
    from envoy_autoreload.changed_since import SpawnMark
    from envoy_autoreload.child import ScriptSpawner

_ENDING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


@dataclass(frozen=True, slots=True)
class EarlyEpoch0:
    """Epoch 0 as spawned here: the snapshot it starts (the one the check validated,
    which the gatekeeper takes instead of pinning the config again: a save in between
    is then a change like any other, and restarts it) and the mark taken just before
    (`changed_since.py`)."""

    config: ConfigGeneration | None
    mark: SpawnMark


@dataclass(eq=False)
class HeadStart:
    """What start-up did before the rest of the daemon was imported."""

    lineage: Lineage
    pinned: ConfigGeneration | None = None
    preflight: Preflight | None = None
    spawner: ScriptSpawner | None = None  # holding epoch 0, once spawned here
    early: EarlyEpoch0 | None = None  # what that epoch 0 starts
    _mask: set[int | signal.Signals] | None = field(default=None, repr=False)

    def spawn_epoch_0(self, settings: Settings) -> None:
        """Wait for the start-up check and, if it passed, spawn epoch 0 now."""
        preflight, pinned = self.preflight, self.pinned
        if preflight is None or (pinned is not None and self.lineage.failed(pinned)):
            return  # no check to go by, or the gatekeeper starts the last good instead
        # Imported, and the roots listed, while Envoy validates: the spawn waits for
        # neither (head_start itself imports little, so that the check starts at once).
        from envoy_autoreload.changed_since import mark_spawn
        from envoy_autoreload.child import ScriptSpawner
        from envoy_autoreload.signal_mask import SIGNAL_PRIORITY
        from envoy_autoreload.traps import command_line_outputs

        roots = settings.watch_paths()
        written = command_line_outputs(settings.start_script)
        spawner = ScriptSpawner(settings.start_script, settings.script_args)
        if not decide_ahead(preflight).ok:
            return  # the gatekeeper says why, or starts the last good generation
        # Blocked before the spawn, so that not even its SIGCHLD comes before the loop
        # (the child starts with none blocked: `child._dies_with_the_daemon`).
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNAL_PRIORITY)
        mark = mark_spawn(roots, written)
        if not spawner.fire_first(pinned.path if pinned is not None else None):
            self._restore_mask()
            return  # the supervisor's own spawn reports why the script cannot run
        self.spawner, self.early = spawner, EarlyEpoch0(pinned, mark)

    def close(self) -> None:
        """An epoch 0 the supervisor never took (start-up failed after the spawn) is
        killed; the signal mask is what it was."""
        if self.spawner is not None:
            self.spawner.release()
        self._restore_mask()

    def _restore_mask(self) -> None:
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            self._mask = None


@contextlib.contextmanager
def head_start(settings: Settings) -> Iterator[HeadStart]:
    """The daemon's lineage (the pin needs it), with the check started; all of it is
    closed on the way out, whatever happened meanwhile."""
    lineage = open_lineage(settings)
    try:
        head = HeadStart(lineage)
        if settings.gated:
            head.pinned = lineage.pin()
            config = head.pinned.path if head.pinned is not None else None
            head.preflight = first_check(settings, config)
        with commands_ahead(head.preflight), _signals_end_the_check():
            try:
                yield head
            finally:
                head.close()
    finally:
        lineage.close()


@contextlib.contextmanager
def _signals_end_the_check() -> Iterator[None]:
    """Until the reactor takes the signals over, TERM, INT and HUP end the daemon, as
    they did before there was a check to start this early, but not the check's Envoy
    with it (that runs in a process group of its own): the check is killed, and the
    daemon exits 128 + the signal's number through every `finally` on the way (the
    lineage's lock, the commands). An exit, not a signal raised again: as PID 1 (a
    container without an init) that would be ignored, and start-up would go on. A
    signal the daemon was started with ignored (`nohup`, `&`) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Handler] = {}

    def end(signum: int, frame: FrameType | None) -> None:
        for number in previous:  # a second signal must not interrupt the kill below
            signal.signal(number, signal.SIG_IGN)
        drop_commands_ahead()
        raise SystemExit(128 + signum)

    for signum in _ENDING_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, end)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
