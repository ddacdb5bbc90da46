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


def test_a_batch_wakes_the_writer_once_at_its_end_and_a_flush_inside_it_writes() -> None:
    """Inside a loop turn the writer sleeps (woken, it would take the GIL from the loop
    at its next system call: issue 16); the turn's lines come out when it ends. A
    flush inside a turn (a re-exec's) still writes everything, never waits it out."""
    read_end, write_end = os.pipe()
    out = os.fdopen(write_end, "wb")
    os.set_blocking(read_end, False)
    received = bytearray()
    try:
        relay = StderrRelay(out)
        with relay.batched():
            relay.write(b"one\n")
            held_until = time.monotonic() + 0.3
            while time.monotonic() < held_until:  # the writer must not wake meanwhile
                assert relay.backlog == len(b"one\n"), "written inside the batch"
                time.sleep(0.01)
        wait_until(
            lambda: _read_into(received, read_end) and b"one\n" in received,
            timeout_s=10,
            what="the batch written once it ended",
        )
        with relay.batched():
            relay.write(b"two\n")
            began = time.monotonic()
            relay.flush(timeout_s=5.0)
            assert time.monotonic() - began < 4.0, "flush waited for its timeout"
            assert relay.backlog == 0
        relay.close()
    finally:
        out.close()
        os.close(read_end)
