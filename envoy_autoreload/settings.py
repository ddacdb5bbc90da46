"""The daemon's settings, checked once at start-up and frozen afterwards."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from envoy_autoreload.envoy_config import AdminAddress
from envoy_autoreload.errors import StartScriptError


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


def check_start_script(path: Path) -> Path:
    """A usage error naming the path unless it is an executable regular file."""
    if not path.exists():
        raise StartScriptError(f"start script {path} does not exist")
    if not path.is_file():
        raise StartScriptError(f"start script {path} is not a file")
    if not os.access(path, os.X_OK):
        raise StartScriptError(f"start script {path} is not executable (chmod +x {path})")
    return path.absolute()
