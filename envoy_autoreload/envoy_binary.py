"""What an Envoy binary is: its identity on disk and what it says about itself.

Its own module because both the gate (which asks a binary) and the generations (which
remember the binary they run) need it; before, `child.py` and `validation.py` imported
each other for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# (device, inode, size, mtime_ns): a package upgrade renames a new file over the old
# one, so any of these changing means "another binary".
BinaryIdentity = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class BinaryInfo:
    path: Path
    identity: BinaryIdentity
    version: str
    # None when not asked: at start-up the running Envoy's own /server_info says it
    # (`EnvoyFamily.hot_restart_version`), and only a changed binary is compared with it.
    hot_restart_version: str | None

    @property
    def release(self) -> str:
        """`1.40.0` out of `9e55.../1.40.0/Clean/RELEASE/BoringSSL`."""
        parts = self.version.split("/")
        return parts[1] if len(parts) > 1 else self.version


def binary_identity(path: Path) -> BinaryIdentity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
