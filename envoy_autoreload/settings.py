"""The daemon's settings, checked once at start-up and frozen afterwards."""

from __future__ import annotations

import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from envoy_autoreload.errors import StartScriptError, UsageError

if TYPE_CHECKING:  # imported where used: the start-up check starts before them (issue 16)
    from envoy_autoreload.addresses import AdminAddress
    from envoy_autoreload.digest import WatchRoot
    from envoy_autoreload.watch import WatcherKind

DEFAULT_ENVOY: Final = "envoy"


@dataclass(frozen=True, slots=True)
class Settings:
    start_script: Path
    script_args: tuple[str, ...] = ()
    term_wait_s: float = 30.0
    start_timeout_s: float = 60.0
    max_drain_wait_s: float = 60.0
    config: Path | None = None
    admin_address: AdminAddress | None = None
    base_id: int | None = None
    exit_on_child_failure: bool = False
    watch: tuple[Path, ...] = ()
    envoy: Path | None = None
    watch_binary: bool = True
    watcher: WatcherKind = "auto"
    ignore: tuple[str, ...] = ()
    debounce_s: float = 0.3
    debounce_max_s: float = 5.0
    watch_degraded: bool = False
    validate: bool = True
    validate_timeout_s: float = 30.0
    on_incompatible_binary: Literal["refuse", "restart"] = "refuse"
    log_format: Literal["human", "json"] = "human"
    # Generations (config snapshots, history, probation and rollback): off without a
    # state directory (None) or without --config.
    state_dir: Path | None = None
    keep_generations: int = 10
    health_window_s: float = 10.0
    health_urls: tuple[str, ...] = ()
    rollback: bool = True
    watch_referenced: bool = True  # the files the config names (certificates, Lua...)

    @property
    def gated(self) -> bool:
        """Whether each start is checked first: that needs a binary, and something to
        check, a config to validate or a watched binary to vet."""
        return self.envoy is not None and (
            (self.validate and self.config is not None) or (self.watch_binary and bool(self.watch))
        )

    def watch_roots(self) -> list[WatchRoot]:
        """Nothing without --watch (the drop-in restarter); with it, every --watch path
        plus the config and the Envoy binary, since either changing means a restart."""
        if not self.watch:
            return []
        from envoy_autoreload.digest import WatchRoot

        return [WatchRoot(path) for path in self.watch_paths()]

    def watch_paths(self) -> list[Path]:
        """The watch roots' paths, each once, without importing the digest (20 ms here):
        epoch 0's spawn mark needs them before the rest of the daemon is imported."""
        if not self.watch:
            return []
        paths = list(self.watch)
        if self.config is not None:
            paths.append(self.config)
        if self.watch_binary and self.envoy is not None:
            paths.append(self.envoy)
        return list(dict.fromkeys(paths))


def resolve_envoy(value: str) -> Path | None:
    """The Envoy binary: a path, a name on PATH, or (for the default name) the one the
    `envoy` extra installed next to our own interpreter, so a venv works unactivated."""
    if os.sep in value:
        path = Path(value).absolute()
        return path if path.exists() else None
    found = shutil.which(value)
    if found is not None:
        return Path(found)
    if value == DEFAULT_ENVOY:
        beside_us = Path(sys.executable).parent / DEFAULT_ENVOY
        if os.access(beside_us, os.X_OK):
            return beside_us
    return None


def check_envoy(value: str, *, explicit: bool) -> Path | None:
    """A usage error if an --envoy given on purpose cannot be found."""
    path = resolve_envoy(value)
    if path is None and explicit:
        raise UsageError(f"Envoy binary {value} not found (give --envoy PATH)")
    return path


def check_start_script(path: Path) -> Path:
    """A usage error naming the path unless it is an executable regular file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise StartScriptError(f"start script {path} does not exist") from None
    except OSError as err:
        raise StartScriptError(f"start script {path} cannot be reached: {err.strerror}") from err
    if not stat.S_ISREG(mode):
        raise StartScriptError(f"start script {path} is not a file")
    if not os.access(path, os.X_OK):
        raise StartScriptError(f"start script {path} is not executable (chmod +x {path})")
    return path.absolute()


def check_config(path: Path) -> Path:
    """A usage error naming the path unless it is a readable file."""
    try:
        is_file = stat.S_ISREG(path.stat().st_mode)
    except FileNotFoundError:
        raise UsageError(f"Envoy config {path} does not exist") from None
    except OSError as err:
        raise UsageError(f"Envoy config {path} cannot be read: {err.strerror}") from err
    if not is_file:
        raise UsageError(f"Envoy config {path} is not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"Envoy config {path} is not readable")
    return path.absolute()


DEFAULT_STATE_DIR: Final = Path("/var/lib/envoy-autoreload")


def default_state_dir() -> Path:
    """systemd's `StateDirectory=` (the first of its list), else /var/lib."""
    given = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(given) if given else DEFAULT_STATE_DIR
