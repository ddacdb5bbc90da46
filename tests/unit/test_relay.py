"""The stderr relay: the loop's writes never block, the backlog is bounded, order kept."""

from __future__ import annotations

import contextlib
import os
import time

from envoy_autoreload.relay import StderrRelay
from tests.helpers import wait_until


def test_writes_never_block_and_a_full_backlog_is_dropped_then_reported() -> None:
    read_end, write_end = os.pipe()
    out = os.fdopen(write_end, "wb")
    try:
        relay = StderrRelay(out, max_pending=256 * 1024)
        chunk = b"x" * 1023 + b"\n"
        began = time.monotonic()
        for _ in range(2048):  # 2 MiB into a 64 KiB pipe nobody reads
            relay.write(chunk)
        assert time.monotonic() - began < 2.0, "a write blocked on the unread pipe"
        relay.write(b"last\n")
        received = bytearray()
        os.set_blocking(read_end, False)  # a test that waits never hangs in a read

        def drained() -> bool:
            _read_into(received, read_end)
            return b"bytes of output dropped" in received and relay.backlog == 0

        # Written while the queue is still full, "after" would be dropped (and reported
        # only with the next write): wait until the backlog is all out.
        wait_until(drained, timeout_s=10, what="the relay to resume and report the drop")
        relay.write(b"after\n")
        wait_until(
            lambda: _read_into(received, read_end) and b"after\n" in received,
            timeout_s=10,
            what="output written after the backlog cleared",
        )
        assert received.index(b"bytes of output dropped") < received.index(b"after\n")
        relay.close()
    finally:
        out.close()
        os.close(read_end)


def _read_into(buffer: bytearray, fd: int) -> bool:
    with contextlib.suppress(BlockingIOError):
        buffer.extend(os.read(fd, 1 << 20))
    return True
