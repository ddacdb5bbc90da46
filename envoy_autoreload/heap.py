"""The daemon's long-lived objects, out of the garbage collector's full passes.

Once the first hashing of the watched files is done, the daemon holds what it will
hold for its whole life: its modules, the supervisor, and the snapshot of every watched
file (100,000 at the scale issue 16 asks for). Each full pass of CPython's cyclic
collector walks all of it, on the event loop: 20-35 ms per pass measured here during
`loopstall.py` (a `gc.callbacks` probe), landing on whatever turn allocated last, a
restart's or a burst's. `gc.freeze()` at that moment moves those objects out of the
collector's generations: the later full passes measured 3 ms. No `gc.collect()` before
it, which would be the same 20 ms pass on the loop; the cost is that cyclic garbage not
collected yet, and cycles among frozen objects that die later (an exited epoch's
records), stay allocated: kilobytes, once.

Only a daemon process settles its heap (`enable`, from the command line): a test that
runs the supervisor in-process must not freeze the test runner's garbage.
"""

from __future__ import annotations

import gc
import logging

from envoy_autoreload.logs import log_event

logger = logging.getLogger(__name__)
_enabled = False


def enable() -> None:
    """This process is the daemon: `settle` freezes from now on."""
    global _enabled
    _enabled = True


def settle() -> None:
    """What is allocated now lives as long as the daemon (see the module's notes)."""
    if _enabled:
        gc.freeze()
        log_event(logger, logging.DEBUG, "heap.settled", frozen=gc.get_freeze_count())
