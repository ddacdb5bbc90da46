"""The LIVE probe leaves admin alone while a hot-restarted Envoy holds the INITIALIZING
flag (`EnvoyFamily.is_live`, issue 16): it is not LIVE then, and `/server_info` would
be built by its parent or by itself on the cores it starts on. A flag that stays set
past `FLAG_TRUSTED_S` no longer holds the question back."""

from __future__ import annotations

import struct
import time
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from envoy_autoreload.addresses import AdminAddress
from envoy_autoreload.admin import ServerInfo
from envoy_autoreload.family import FLAG_TRUSTED_S, EnvoyFamily
from envoy_autoreload.hot_restart_shm import shm_path
from envoy_autoreload.launcher import FLAG_PROBE_S, FLAG_WATCH_S, next_probe_s
from envoy_autoreload.roster import Generation
from envoy_autoreload.settings import Settings
from tests.helpers import allocate_base_id

ADMIN = AdminAddress("127.0.0.1", 19901)


@dataclass
class FakeGen:
    """A starting epoch 1 whose Envoy was found in /proc just now."""

    epoch: int = 1
    pid: int = 4242
    envoy: object = "found"
    envoy_seen_at: float = field(default_factory=time.monotonic)
    saw_initializing: bool = False
    config: None = None


@dataclass
class FakeAsker:
    asked: list[AdminAddress] = field(default_factory=list)

    def ask(self, key: Hashable, address: AdminAddress) -> tuple[bool, ServerInfo | None]:
        self.asked.append(address)
        return True, ServerInfo("LIVE", 1, "1.40.0", "11.104", False)


@pytest.fixture
def segment() -> Iterator[Path]:
    path = shm_path(allocate_base_id())
    yield path
    path.unlink(missing_ok=True)


def flags(path: Path, value: int) -> None:
    data = bytearray(104)
    data[0:16] = struct.pack("=QQ", 104, 11)
    data[96:104] = struct.pack("=Q", value)
    path.write_bytes(bytes(data))


def family_for(segment: Path) -> tuple[EnvoyFamily, FakeAsker]:
    base_id = int(segment.name.rpartition("_")[2]) // 10
    settings = Settings(start_script=Path("/nonexistent"), base_id=base_id, admin_address=ADMIN)
    family = EnvoyFamily(settings)
    asker = FakeAsker()
    family.live_answers = asker  # type: ignore[assignment]
    return family, asker


def test_admin_is_not_asked_while_the_flag_is_held(segment: Path) -> None:
    family, asker = family_for(segment)
    gen = FakeGen()
    flags(segment, 1)
    assert not family.is_live(cast("Generation", gen))
    assert asker.asked == [], "admin was asked while the new Envoy initializes"
    assert gen.saw_initializing, "the flag, once seen, still marks the hand-over"
    flags(segment, 0)  # it told its parent to drain
    assert family.is_live(cast("Generation", gen))
    assert asker.asked == [ADMIN]


def test_a_flag_held_too_long_no_longer_holds_admin_back(segment: Path) -> None:
    family, asker = family_for(segment)
    gen = FakeGen(envoy_seen_at=time.monotonic() - FLAG_TRUSTED_S - 0.1)
    flags(segment, 1)
    assert family.is_live(cast("Generation", gen))
    assert asker.asked == [ADMIN]


def test_epoch_0_and_an_unreadable_segment_ask_admin(segment: Path) -> None:
    family, asker = family_for(segment)
    flags(segment, 1)
    asker_answers_epoch_0 = FakeGen(epoch=0)
    family.is_live(cast("Generation", asker_answers_epoch_0))
    segment.unlink()
    family.is_live(cast("Generation", FakeGen()))
    assert asker.asked == [ADMIN, ADMIN]


def test_a_start_whose_envoy_holds_the_flag_is_probed_densely_for_a_while() -> None:
    """While its Envoy holds the flag a probe is a read of shared memory; the flag clears
    as it goes LIVE, so probing every few ms then sees LIVE within a few ms. Before the
    flag was seen, and past `FLAG_WATCH_S`, probes back off as before."""
    gen = FakeGen()
    start = cast(Generation, gen)
    assert next_probe_s(start, 0.04) == pytest.approx(0.01)
    assert next_probe_s(start, 0.2) == pytest.approx(0.05)
    gen.saw_initializing = True
    assert next_probe_s(start, 0.04) == FLAG_PROBE_S
    assert next_probe_s(start, FLAG_WATCH_S + 0.1) == pytest.approx(0.1)
