"""Reading the few facts the supervisor needs out of an Envoy bootstrap (YAML or JSON).

Only `admin.address.socket_address` is read: it is where we ask "is epoch N LIVE?".
Validation of the whole config is Envoy's job (`--mode validate`), never ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from envoy_autoreload.errors import ConfigError, UsageError

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


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
    if not sep or not port.isdigit():
        raise UsageError(f"admin address {text!r} is not HOST:PORT")
    host = host.strip("[]")
    return AdminAddress(_WILDCARDS.get(host, host), int(port))


def admin_address_from_config(path: Path) -> AdminAddress | None:
    """The admin socket address a bootstrap config binds, or None when it has none usable
    (no admin block, a pipe, or port 0)."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read Envoy config {path}: {err.strerror}") from err
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse Envoy config {path}: {_first_line(err)}") from err
    socket_address = _dig(document, "admin", "address", "socket_address")
    if not isinstance(socket_address, dict):
        return None
    port = socket_address.get("port_value")
    host = socket_address.get("address", "")
    if not isinstance(port, int | str) or not str(port).isdigit() or int(port) == 0:
        return None
    return AdminAddress(_WILDCARDS.get(str(host), str(host)), int(port))


def _dig(document: object, *keys: str) -> object:
    for key in keys:
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    return document


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split())
