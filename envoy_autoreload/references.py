"""Which files an Envoy bootstrap makes Envoy read once, at start: they restart it too.

Envoy reads certificates, keys, CAs, CRLs, Lua sources and `direct_response` bodies named
by a DataSource `filename` once, when it starts; a renewed certificate outside `--watch`
changes nothing until someone restarts by hand (upstream #10387, #891; consul #8198). So
the daemon watches every such file like a `--watch` path.

What is left out, and why (each named in `watch.referenced` and `--check`):
- files Envoy writes (access logs: `envoy_outputs.py`): watched, they restart Envoy at
  every request (REVIEW-core finding 15);
- files Envoy watches itself: a path-based xDS source (`path_config_source`, or a
  legacy `path`) and SDS secrets under a `watched_directory`: Envoy reloads them
  without a restart, and a restart for them would only cut connections;
- standard streams and other devices.

The caller parses the bootstrap and passes the document; nothing here reads a file,
except to resolve a name with `..` in it as the kernel does: `tls/../ca.pem`, with `tls`
a symlink, is `ca.pem` beside the link's target, not beside the link.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from envoy_autoreload.envoy_outputs import logged_paths, path_envoy_opens, paths_envoy_writes

WATCHED_BY_ENVOY: Final = "Envoy watches it itself and reloads it without a restart"
WRITTEN_BY_ENVOY: Final = "Envoy writes it (an access log): it would restart Envoy at each request"


@dataclass(frozen=True, slots=True)
class References:
    reads: frozenset[Path]  # to watch: a change restarts Envoy
    excluded: tuple[tuple[Path, str], ...]  # named, not watched, and why
    # The names of files in the config that are relative, as written: Envoy takes them
    # from its own working directory, the daemon from its own (`relative_names_trap`).
    relative: tuple[str, ...] = ()


def files_envoy_reads(document: Mapping[str, object], base: Path) -> References:
    """The files `document` makes Envoy read at start, and those left out (with why).
    `base` is Envoy's working directory, which relative paths are taken from."""
    reads: set[Path] = set()
    itself: set[Path] = set()
    named: list[str] = []
    for raw, watched in _filenames(document, watched=False):
        if raw.startswith(("/dev/", "/proc/")):
            continue
        (itself if watched else reads).add(path_envoy_opens(base, raw))
        named.append(raw)
    for raw in _xds_paths(document):
        itself.add(path_envoy_opens(base, raw))
        named.append(raw)
    written = paths_envoy_writes(document, base)
    excluded = [(p, WRITTEN_BY_ENVOY) for p in sorted(written)]
    excluded += [(p, WATCHED_BY_ENVOY) for p in sorted(itself - written)]
    named += logged_paths(document)
    relative = tuple(sorted({raw for raw in named if not Path(raw).is_absolute()}))
    return References(frozenset(reads - written - itself), tuple(excluded), relative)


def relative_names_trap(names: tuple[str, ...], daemon_cwd: Path, envoy_cwd: Path | None) -> str:
    """What to tell an operator whose config names files relative to a working
    directory: Envoy takes them from its own (the start script's; a `cd` there moves
    it), the daemon's validation and watching from the daemon's. `envoy_cwd` None: not
    known (no Envoy runs yet)."""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    where = (
        f"Envoy runs in {envoy_cwd}, the daemon, which validates and watches them, in {daemon_cwd}"
        if envoy_cwd is not None
        else f"the daemon validates and watches them from its own, {daemon_cwd}"
    )
    return (
        f"the config names relative paths ({shown}), which Envoy takes from its working "
        f"directory; {where}. Keep the two the same (systemd WorkingDirectory=, no `cd` "
        "in the start script) or name them absolutely"
    )


def _filenames(node: object, *, watched: bool) -> Iterator[tuple[str, bool]]:
    """Every DataSource `filename` (a dict with a string `filename`), and whether it
    sits under an SDS secret with a `watched_directory` (Envoy reloads those)."""
    if isinstance(node, Mapping):
        inside = watched or "watched_directory" in node
        filename = node.get("filename")
        if isinstance(filename, str) and filename:
            yield filename, inside
        for key, value in node.items():
            if key != "filename":
                yield from _filenames(value, watched=inside)
    elif isinstance(node, list):
        for item in node:
            yield from _filenames(item, watched=watched)


def _xds_paths(node: object) -> Iterator[str]:
    """Files of path-based xDS sources: `{path_config_source: {path: ...}}` or the
    legacy `{path: ...}` inside a config source."""
    if isinstance(node, Mapping):
        source = node.get("path_config_source")
        if isinstance(source, Mapping) and isinstance(source.get("path"), str):
            yield str(source["path"])
        for key in ("cds_config", "lds_config"):
            config = node.get(key)
            if isinstance(config, Mapping) and isinstance(config.get("path"), str):
                yield str(config["path"])
        for value in node.values():
            yield from _xds_paths(value)
    elif isinstance(node, list):
        for item in node:
            yield from _xds_paths(item)
