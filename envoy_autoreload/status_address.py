"""`--status-address HOST:PORT`, checked and bound at start-up.

Apart from `status_server.py`, which imports `http.server` and `prometheus_client`
(about 0.03 s): the address is checked before Envoy validates epoch 0's config, and
bound before epoch 0 is spawned, so an address in use refuses start-up before any
Envoy runs; the server is started on that socket later (`head_start.py`, issue 16).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from typing import Final

from envoy_autoreload.envoy_config import MAX_PORT, ascii_port
from envoy_autoreload.errors import UsageError

MAX_CONNECTIONS: Final = 32  # served at once (status_server.py)
# socket's default backlog of 5 makes the kernel drop SYNs in a burst: scrapers and
# probes then wait for a retransmit (1 s, 3 s, ...) although a slot is free.
BACKLOG: Final = 2 * MAX_CONNECTIONS


def parse_status_address(text: str, *, allow_remote: bool) -> tuple[str, int]:
    """(host, port) from `HOST:PORT` or `[V6]:PORT`; a UsageError naming the mistake
    otherwise, so a typo is one line at start-up, never a traceback from `bind`."""
    host, sep, port_text = text.strip().rpartition(":")
    host = host.strip("[]")
    port = ascii_port(port_text)
    if not sep or port is None or not host:
        raise UsageError(f"status address {text!r} is not HOST:PORT (PORT: 1-{MAX_PORT})")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not allow_remote:
        raise UsageError(
            f"status address {text} is not a loopback address: /status names PIDs and paths; "
            "give --status-allow-remote to serve it beyond this host"
        )
    return host, port


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
