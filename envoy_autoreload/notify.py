"""systemd's notify protocol: one datagram to $NOTIFY_SOCKET; a no-op outside systemd.

The protocol is documented (sd_notify(3)) and is one `sendto`, so no library is needed:
newline-separated `KEY=VALUE` assignments to a unix datagram socket whose path may be
abstract (a leading `@`). Failures are ignored: telling systemd is best effort and must
never disturb supervision. As gunicorn's systemd.py does, the variable is read once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address = "\0" + address[1:] if address and address.startswith("@") else address

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, **fields: str) -> None:
        if not self._address:
            return
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        with (
            contextlib.suppress(OSError),
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
        ):
            sock.setblocking(False)  # a full receiver queue must not stall the event loop
            sock.sendto(payload, self._address)

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status)

    def reloading(self, status: str) -> None:
        # MONOTONIC_USEC lets systemd tell this reload from an earlier one (systemd 253+).
        self.send(
            RELOADING="1",
            MONOTONIC_USEC=str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000),
            STATUS=status,
        )

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def stopping(self, status: str) -> None:
        self.send(STOPPING="1", STATUS=status)
