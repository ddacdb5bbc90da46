"""`--status-address HOST:PORT`, bound at start-up (checked by `addresses.py`).

Apart from `status_server.py`, which imports `http.server` and `prometheus_client`
(about 0.03 s): the address is checked before Envoy validates epoch 0's config, and
bound while it does, before epoch 0 is spawned, so an address in use refuses start-up
before any Envoy runs; the server is started on that socket later (`head_start.py`,
issue 16).
"""

from __future__ import annotations

import contextlib
import socket
from typing import Final

from envoy_autoreload.errors import UsageError

MAX_CONNECTIONS: Final = 32  # served at once (status_server.py)
# socket's default backlog of 5 makes the kernel drop SYNs in a burst: scrapers and
# probes then wait for a retransmit (1 s, 3 s, ...) although a slot is free.
BACKLOG: Final = 2 * MAX_CONNECTIONS


def listen_status(address: tuple[str, int]) -> socket.socket:
    """The status server's listening socket, IPv6 when the host is; a UsageError line
    when it cannot be had (the port is taken, the host is not ours)."""
    host, port = address
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise UsageError(f"cannot serve status on {show_address(address)}: {_why(err)}") from err
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as HTTPServer does
        sock.bind((host, port))  # no reverse DNS lookup (HTTPServer's getfqdn can hang)
        sock.listen(BACKLOG)
    except (OSError, OverflowError) as err:
        with contextlib.suppress(OSError):
            sock.close()
        raise UsageError(f"cannot serve status on {show_address(address)}: {_why(err)}") from err
    return sock


def show_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _why(err: BaseException) -> str:
    return err.strerror if isinstance(err, OSError) and err.strerror else str(err)
