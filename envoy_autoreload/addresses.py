"""HOST:PORT as the operator writes it: Envoy's admin address (--admin-address, its
--admin-address-path file, the bootstrap's admin block) and the ports of our own.

Apart from the bootstrap's YAML (envoy_config.py) and from binding the status address
(status_address.py) so that checking --status-address imports neither PyYAML (15 ms
here) nor `socket` before the start-up check has started (issue 16).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from envoy_autoreload.errors import UsageError

# Where Envoy listens on every address, we ask on loopback.
WILDCARDS: Final = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
MAX_PORT: Final = 65535


@dataclass(frozen=True, slots=True)
class AdminAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_admin_address(text: str) -> AdminAddress:
    """`HOST:PORT` or `[V6]:PORT` as given to --admin-address or in --admin-address-path."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    number = ascii_port(port)
    if not sep or number is None:
        raise UsageError(f"admin address {text!r} is not HOST:PORT (PORT: 1-{MAX_PORT})")
    host = host.strip("[]")
    return AdminAddress(WILDCARDS.get(host, host), number)


def ascii_port(text: str) -> int | None:
    """A TCP port 1-65535 written in ASCII digits, else None. `str.isdigit()` also
    accepts `²` and Arabic-Indic digits, which `int()` then refuses or reads as a number
    nobody meant; a port beyond 65535 makes `socket.bind` raise OverflowError."""
    if not text or not text.isascii() or not text.isdigit():
        return None
    number = int(text)
    return number if 0 < number <= MAX_PORT else None


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
