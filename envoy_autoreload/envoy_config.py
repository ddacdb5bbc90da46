"""Reading the few facts the supervisor needs out of an Envoy bootstrap (YAML or JSON).

Only `admin.address.socket_address` is read here: it is where we ask "is epoch N LIVE?"
(`bootstrap_facts.py` adds the files the config makes Envoy read and write; the
address itself is `addresses.py`'s). Validation
of the whole config is Envoy's job (`--mode validate`), never ours.

The file is parsed from bytes, never decoded with the locale first: Envoy's yaml-cpp
passes invalid UTF-8 in comments through and decodes UTF-16 with a BOM, so a config
Envoy serves may hold bytes Python's text decoding rejects. PyYAML detects the encoding
itself and reports what it cannot read as a YAMLError, which becomes one ConfigError
line; nothing a config holds may escape as another exception, since the supervisor
reads it on its event loop. libyaml is used where installed: the pure-Python parser
takes about 0.26 s of CPU per 120 KB. Even yaml.load with libyaml takes about 0.45 s per
MB (it composes and constructs in Python); a plain document is built from libyaml's
events instead, about 0.11 s per MB (`plain_yaml.py`). Either way the daemon never
parses a big bootstrap on its event loop, nor in its own process: `bootstrap_facts.py`
does it in a child; these functions run there and in --check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import yaml

from envoy_autoreload.addresses import WILDCARDS, AdminAddress, ascii_port
from envoy_autoreload.errors import ConfigError
from envoy_autoreload.plain_yaml import NotPlain, load_plain

_LOADER: Final[type[yaml.SafeLoader] | type[yaml.CSafeLoader]] = (
    yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader
)


def load_bootstrap(path: Path) -> object:
    """The parsed bootstrap document. Raises ConfigError, and only that, for a file that
    cannot be read or parsed."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise unreadable(path, err) from err
    return parse_bootstrap(data, path)


def unreadable(path: Path, err: OSError) -> ConfigError:
    return ConfigError(f"cannot read Envoy config {path}: {err.strerror}")


def parse_bootstrap(data: bytes, path: Path) -> object:
    """`data`, read from `path`, parsed. Raises ConfigError, and only that. Built from
    libyaml's events where it is plain data (`plain_yaml.py`, 4-8 times faster), else
    by yaml.load, whose errors these are."""
    try:
        return load_plain(data)
    except NotPlain:
        pass
    try:
        return yaml.load(data, Loader=_LOADER)
    # ValueError covers UnicodeDecodeError; RecursionError a pathologically nested file.
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        raise ConfigError(f"cannot parse Envoy config {path}: {_first_line(err)}") from err


def admin_address_from_config(path: Path) -> AdminAddress | None:
    """The admin socket address a bootstrap config binds, or None when it has none usable
    (no admin block, a pipe, or port 0).

    Raises ConfigError, and only that, for a file that cannot be read or parsed.
    """
    return admin_address_in(load_bootstrap(path))


def admin_address_in(document: object) -> AdminAddress | None:
    """The admin socket address of a parsed bootstrap (see `admin_address_from_config`)."""
    socket_address = _dig(document, "admin", "address", "socket_address")
    if not isinstance(socket_address, dict):
        return None
    port = socket_address.get("port_value")
    host = socket_address.get("address", "")
    if isinstance(port, bool) or not isinstance(port, int | str):
        return None
    number = ascii_port(str(port))
    if number is None:
        return None
    return AdminAddress(WILDCARDS.get(str(host), str(host)), number)


def _dig(document: object, *keys: str) -> object:
    for key in keys:
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    return document


def _first_line(err: Exception) -> str:
    """The error on one line, at most 300 characters: a parser's message can quote the
    offending content, and this line is logged and shown in --check."""
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:300] + "…"
