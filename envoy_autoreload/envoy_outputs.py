"""Which files an Envoy bootstrap makes Envoy write: its file access logs.

Why the watcher needs to know: an access log inside a watched directory changes with
every request, and every `envoy --mode validate` opens it for writing (ENVOY_FACTS §1),
which ends in IN_CLOSE_WRITE. Hashed like a config file, it restarts Envoy, whose next
validation writes it again: a restart loop (review #15). `ChangeDetector.exclude_paths`
takes what `paths_envoy_writes` finds.

Pure: the caller parses the bootstrap (YAML or JSON) and passes the result; nothing
here reads a file. What is found:
- every file access logger, wherever it sits (listeners, HTTP connection managers,
  TCP proxies, admin): a `typed_config` whose `@type` is `FileAccessLog`, also when
  wrapped in a `TypedStruct`;
- `admin.access_log_path`, the legacy admin log (removed in Envoy 1.22, still seen in
  old configs).
Standard streams (`/dev/stdout`, `/dev/stderr`) and other devices are no files to
exclude. Other outputs (`--log-path`, `admin.profile_path`) are not in the bootstrap's
logger list or are written only on request; they are left out on purpose.

Rejected: matching on the logger's `name` (`envoy.access_loggers.file`); the name is
free text and Envoy picks the extension by `@type`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

_FILE_ACCESS_LOG_TYPES: Final = frozenset(
    {
        "envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "envoy.config.accesslog.v2.FileAccessLog",  # v2 configs, kept by old deployments
    }
)
_TYPED_STRUCTS: Final = frozenset({"xds.type.v3.TypedStruct", "udpa.type.v1.TypedStruct"})


def paths_envoy_writes(config: Mapping[str, object], base: Path) -> frozenset[Path]:
    """Absolute paths of the files this bootstrap's access loggers write.

    `base` is the directory a relative path is taken from: Envoy's working directory,
    which is the start script's. The paths are normalised but not resolved (the
    watcher resolves symlinks itself, at each scan), but for a `..` after a symlink
    (`path_envoy_opens`).
    """
    found: set[Path] = set()
    for raw in logged_paths(config):
        if raw.startswith(("/dev/", "/proc/")):
            continue  # /dev/stdout, /dev/stderr, /proc/self/fd/1: no file in any tree
        found.add(path_envoy_opens(base, raw))
    return frozenset(found)


def logged_paths(config: Mapping[str, object]) -> Iterator[str]:
    """The paths of its access logs as the config writes them (relative ones too)."""
    admin = config.get("admin")
    if isinstance(admin, Mapping):
        legacy = admin.get("access_log_path")
        if isinstance(legacy, str) and legacy:
            yield legacy
    for node in _mappings(config):
        path = _file_logger_path(node)
        if path:
            yield path


def _mappings(root: object) -> Iterator[Mapping[str, object]]:
    """Every mapping in a parsed document, on an explicit stack.

    A stack, not recursion: a deep document must not raise RecursionError on the loop.
    `id()` guards: PyYAML builds shared and even self-referencing objects from anchors
    and aliases (`a: &x [*x]`), which a naive walk would follow forever.
    """
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, Mapping):
            yield node
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)


def _file_logger_path(node: Mapping[str, object]) -> str | None:
    """The `path` of a FileAccessLog `typed_config`, or None for any other mapping."""
    typed = node.get("typed_config")
    if not isinstance(typed, Mapping):
        return None
    type_name = _type_name(typed.get("@type"))
    if type_name in _TYPED_STRUCTS:
        type_name = _type_name(typed.get("type_url"))
        typed = typed.get("value")
        if not isinstance(typed, Mapping):
            return None
    if type_name not in _FILE_ACCESS_LOG_TYPES:
        return None
    path = typed.get("path")
    return path if isinstance(path, str) and path else None


def path_envoy_opens(base: Path, raw: str) -> Path:
    """The file Envoy opens for `raw`, named as a walk of the tree names it. `abspath`
    drops `..` as text, which is wrong after a symlink (`tls/../ca.pem`, `tls` a link,
    is `ca.pem` beside the link's target): the part up to the last `..` is resolved as
    the kernel does, the rest is kept as written, so that a symlink there (kubelet's
    `key -> ..data/key`) is still followed at each scan, not frozen at today's target."""
    parts = Path(raw).parts
    if ".." not in parts:
        return Path(os.path.abspath(base / raw))
    last = len(parts) - parts[::-1].index("..")
    return Path(os.path.realpath(base.joinpath(*parts[:last]))).joinpath(*parts[last:])


def _type_name(type_url: object) -> str:
    """`type.googleapis.com/envoy.x.y.Z` -> `envoy.x.y.Z` (any host prefix)."""
    return type_url.rsplit("/", 1)[-1] if isinstance(type_url, str) else ""
