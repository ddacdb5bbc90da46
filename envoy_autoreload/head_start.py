"""Epoch 0's start-up check, started before the rest of the daemon is imported.

Before epoch 0 the daemon spent about 0.06 s importing itself (the supervisor, the
metrics, the control socket, the watcher) and only then asked Envoy to validate the
config, 0.05-0.08 s more with Python idle: both were on the way to Envoy serving,
which issue 16 wants within 0.3 s of the start. Here the config is pinned and the
check's commands (`envoy --version`, `envoy --mode validate -c SNAPSHOT`) start as soon
as the command line is parsed; the imports, and the walk, run while Envoy validates.

The verdict is unchanged: the gate's start-up check (`CommandGate.check_now`) pins the
config again and takes these processes only if it would run exactly these commands on
the same binary. The snapshot's path names its bytes, so a config saved in between is
another command, which runs afresh; these are killed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

from envoy_autoreload.lineage import Lineage, open_lineage
from envoy_autoreload.settings import Settings
from envoy_autoreload.validation import commands_ahead, drop_commands_ahead, first_check

_ENDING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


@contextlib.contextmanager
def head_start(settings: Settings) -> Iterator[Lineage]:
    """The daemon's lineage (the pin needs it), with the check started; both are
    closed on the way out, whatever happened meanwhile."""
    lineage = open_lineage(settings)
    try:
        pinned = lineage.pin() if settings.gated else None
        config = pinned.path if pinned is not None else None
        preflight = first_check(settings, config) if settings.gated else None
        with commands_ahead(preflight), _signals_end_the_check():
            yield lineage
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
