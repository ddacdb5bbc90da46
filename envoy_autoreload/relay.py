"""Our stderr, written from one thread so the event loop never blocks on it.

Everything the daemon prints (its log lines, and Envoy's own output passed through)
goes to stderr: a terminal, a pipe to journald, a container runtime's log driver. Any
of those can stop reading (a paused terminal, a stalled log driver), and a blocking
write on the loop would then stall signals, deadlines and the watcher, while Envoy's
own stderr pipe to us fills and Envoy's logging threads block in turn (REVIEW-core
finding 12). So writes only queue; one thread writes. The queue is bounded: past
`MAX_PENDING_BYTES` new output is dropped and counted, and the drop is reported in one
line once writing resumes. Order is kept: one queue, one writer.

The writer is woken once a loop turn, when the turn ends (`batched`), not at each
line: woken mid-turn it takes the GIL from the loop at the loop's next system call,
and a restart's turn logs five lines on the way from the burst to the spawn (issue
16: about 0.5 ms of that path went to the hand-overs).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator
from typing import BinaryIO, Final

from envoy_autoreload.signal_mask import signals_blocked

MAX_PENDING_BYTES: Final = 4 * 1024 * 1024


class StderrRelay:
    def __init__(self, out: BinaryIO, max_pending: int = MAX_PENDING_BYTES) -> None:
        self._out = out
        self._max_pending = max_pending
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_bytes = 0
        self._dropped = 0
        self._closed = False
        self._batching = False
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="stderr-relay", daemon=True)
        with signals_blocked():
            self._thread.start()

    def write(self, data: bytes) -> None:
        """Never blocks on the output; drops `data` when the queue is full."""
        with self._lock:
            if self._pending_bytes + len(data) > self._max_pending:
                self._dropped += len(data)
                return
            self._pending.append(data)
            self._pending_bytes += len(data)
            if not self._batching:
                self._lock.notify()

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """Writes made inside queue without waking the writer; it is woken once, at
        the end. `flush` inside still writes everything (a re-exec flushes mid-turn)."""
        with self._lock:
            self._batching = True
        try:
            yield
        finally:
            with self._lock:
                self._batching = False
                if self._pending:
                    self._lock.notify()

    @property
    def backlog(self) -> int:
        """Bytes queued and not written yet."""
        with self._lock:
            return self._pending_bytes

    def flush(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) until everything queued is written: at exit."""
        with self._lock:
            self._lock.notify()  # a batch's writes wait for no one now
            self._lock.wait_for(lambda: not self._pending, timeout=timeout_s)

    def close(self, timeout_s: float = 2.0) -> None:
        """Write what is queued (at most `timeout_s`), then end the thread."""
        self.flush(timeout_s)
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: bool(self._pending) or self._closed)
                if self._closed:
                    return
                data = self._pending[0]
                dropped, self._dropped = self._dropped, 0
            if dropped:
                self._emit(f"(stderr was not read: {dropped} bytes of output dropped)\n".encode())
            self._emit(data)
            with self._lock:
                self._pending.popleft()
                self._pending_bytes -= len(data)
                self._lock.notify_all()

    def _emit(self, data: bytes) -> None:
        with contextlib.suppress(OSError, ValueError):  # our stderr is gone: nothing to do
            self._out.write(data)
            self._out.flush()


class RelayStream:
    """A text stream for `logging.StreamHandler` that writes through a relay."""

    def __init__(self, relay: StderrRelay) -> None:
        self._relay = relay

    def write(self, text: str) -> int:
        self._relay.write(text.encode(errors="replace"))
        return len(text)

    def flush(self) -> None:
        return None
