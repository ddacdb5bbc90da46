"""The signals the daemon handles, and keeping them with the main thread.

Apart from the reactor (loop.py) so that what must block them early (the log relay's
thread at start-up, the mask around epoch 0's spawn in `head_start`) does not import
the reactor and `socket` before the start-up check has started (issue 16).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Final

# Handled in this order when several arrive together: stopping wins over everything,
# reaping comes before a restart so the restart sees who is still alive.
SIGNAL_PRIORITY: Final[tuple[signal.Signals, ...]] = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGCHLD,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Around starting a thread: it inherits a mask that blocks our signals, so only the
    main thread ever receives them. Otherwise, once the main thread blocks them for a
    re-exec (reexec.py), a helper thread would still take one in, and Python would hand
    it to this image's handler, to be lost with the image."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNAL_PRIORITY)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
