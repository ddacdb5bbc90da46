"""`--status-address HOST:PORT`, checked at start-up.

Apart from `status_server.py`, which imports `http.server` and `prometheus_client`
(about 0.03 s): the address is checked before Envoy validates epoch 0's config, the
server is started after (`head_start.py`, issue 16).
"""

from __future__ import annotations

import ipaddress

from envoy_autoreload.envoy_config import MAX_PORT, ascii_port
from envoy_autoreload.errors import UsageError


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
