"""Envoy's hot-restart shared memory: reading and, when safe, clearing its INITIALIZING flag.

Why this exists (ENVOY_FACTS §0, §3): a child of epoch N > 0 sets SHMEM_FLAGS_INITIALIZING
in `/dev/shm/envoy_shared_memory_<base_id*10>` and clears it only when it tells its
parent to drain. A child that dies first leaves the bit set, and from then on every hot
restart fails with "previous envoy process is still initializing" (upstream #726,
closed won't-fix; #33446; #4797). Upstream's restarter never recovers. Zeroing the flags
word with only the healthy parent alive recovers it (observed for every failure kind).

We write only into a segment whose size and version words match a layout we verified
for the running binary's `--hot-restart-version`; for any other version we refuse and
the caller logs that the next restart must be a full one.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

SHM_DIR: Final = Path("/dev/shm")
INITIALIZING: Final = 0x1


@dataclass(frozen=True, slots=True)
class ShmLayout:
    size: int
    version: int
    flags_offset: int


# Verified against Envoy 1.40.0 (`--hot-restart-version` 11.104): u64 size at 0,
# u64 version at 8, two robust mutexes, u64 flags at 96. "11.104" is "version.size".
KNOWN_LAYOUTS: Final[dict[str, ShmLayout]] = {
    "11.104": ShmLayout(size=104, version=11, flags_offset=96),
}


class ShmUnsupported(Exception):
    """The segment is missing or not a layout we verified; say why in one line."""


def shm_path(base_id: int) -> Path:
    return SHM_DIR / f"envoy_shared_memory_{base_id * 10}"


def layout_for(hot_restart_version: str | None) -> ShmLayout:
    if hot_restart_version is None:
        raise ShmUnsupported("the running Envoy's --hot-restart-version is unknown")
    layout = KNOWN_LAYOUTS.get(hot_restart_version.strip())
    if layout is None:
        raise ShmUnsupported(
            f"hot-restart version {hot_restart_version.strip()} has a shared-memory layout "
            f"this envoy-autoreload does not know (known: {', '.join(KNOWN_LAYOUTS)})"
        )
    return layout


def segment_version(path: Path) -> str:
    """The segment's own "version.size" header, as `--hot-restart-version` spells it.

    Envoy accepts a segment only when both words equal its own, so a live family's
    header names the layout its binary uses; used when admin has not told us.
    """
    try:
        with open(path, "rb") as handle:
            header = handle.read(16)
    except OSError as err:
        raise ShmUnsupported(f"cannot open {path}: {err.strerror}") from err
    if len(header) < 16:
        raise ShmUnsupported(f"{path} is too short to be Envoy's shared memory")
    size, version = struct.unpack("=QQ", header)
    return f"{version}.{size}"


def _checked_fd(path: Path, layout: ShmLayout, flags: int) -> int:
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise ShmUnsupported(f"cannot open {path}: {err.strerror}") from err
    try:
        header = os.pread(fd, 16, 0)
        if len(header) < 16 or os.fstat(fd).st_size != layout.size:
            raise ShmUnsupported(f"{path} is not {layout.size} bytes")
        size, version = struct.unpack("=QQ", header)
        if (size, version) != (layout.size, layout.version):
            raise ShmUnsupported(
                f"{path} says size {size} version {version}, expected "
                f"{layout.size} version {layout.version}"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_flags(path: Path, layout: ShmLayout) -> int:
    fd = _checked_fd(path, layout, os.O_RDONLY)
    try:
        raw = os.pread(fd, 8, layout.flags_offset)
    finally:
        os.close(fd)
    return int(struct.unpack("=Q", raw)[0])


def clear_initializing(path: Path, layout: ShmLayout) -> bool:
    """Zero the flags word if INITIALIZING is set; True when it was set and is now clear.

    The caller guarantees that no child of this family is starting: a starting child
    owns the bit, and only a dead one's leftover may be cleared (ENVOY_FACTS §3).
    """
    fd = _checked_fd(path, layout, os.O_RDWR)
    try:
        (flags,) = struct.unpack("=Q", os.pread(fd, 8, layout.flags_offset))
        if not flags & INITIALIZING:
            return False
        os.pwrite(fd, struct.pack("=Q", 0), layout.flags_offset)
        return True
    finally:
        os.close(fd)
