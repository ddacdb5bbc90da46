"""The shared-memory flag and the retry/crash-budget arithmetic."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from envoy_autoreload.backoff import CrashBudget, DeathPacing, exponential_delay
from envoy_autoreload.hot_restart_shm import (
    INITIALIZING,
    ShmUnsupported,
    clear_initializing,
    layout_for,
    read_flags,
    shm_path,
)

LAYOUT = layout_for("11.104")


def _segment(path: Path, *, size: int = 104, version: int = 11, flags: int = 0) -> Path:
    data = bytearray(104)
    data[0:16] = struct.pack("=QQ", size, version)
    data[96:104] = struct.pack("=Q", flags)
    path.write_bytes(bytes(data))
    return path


def test_shm_path_is_base_id_times_ten() -> None:
    assert shm_path(312).name == "envoy_shared_memory_3120"
    assert shm_path(0).name == "envoy_shared_memory_0"


def test_stuck_flag_is_cleared_once(tmp_path: Path) -> None:
    segment = _segment(tmp_path / "shm", flags=INITIALIZING)
    assert read_flags(segment, LAYOUT) == INITIALIZING
    assert clear_initializing(segment, LAYOUT) is True
    assert read_flags(segment, LAYOUT) == 0
    assert clear_initializing(segment, LAYOUT) is False
    assert segment.read_bytes()[:16] == struct.pack("=QQ", 104, 11), "header untouched"


@pytest.mark.parametrize(("size", "version"), [(104, 12), (96, 11)])
def test_unverified_layout_is_never_written(tmp_path: Path, size: int, version: int) -> None:
    segment = _segment(tmp_path / "shm", size=size, version=version, flags=INITIALIZING)
    before = segment.read_bytes()
    with pytest.raises(ShmUnsupported):
        clear_initializing(segment, LAYOUT)
    assert segment.read_bytes() == before


def test_unknown_hot_restart_version_is_refused() -> None:
    with pytest.raises(ShmUnsupported, match=r"12\.200"):
        layout_for("12.200")
    with pytest.raises(ShmUnsupported, match="unknown"):
        layout_for(None)


def test_missing_segment_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ShmUnsupported, match="cannot open"):
        read_flags(tmp_path / "nothing", LAYOUT)


def test_exponential_delay_doubles_to_the_cap() -> None:
    assert [exponential_delay(n, 1.0, 30.0) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_crash_budget_is_five_failures_in_a_sliding_window() -> None:
    budget = CrashBudget(max_failures=5, window_s=300)
    assert not any(budget.record(t) for t in (0, 100, 200, 299))
    assert budget.record(299.5)
    spread = CrashBudget(max_failures=5, window_s=300)
    assert not any(spread.record(t) for t in (0, 200, 400, 600, 800, 1000))


def test_a_death_after_stable_serving_is_met_at_once_and_a_crash_loop_backs_off() -> None:
    pacing = DeathPacing(stable_s=10, forget_s=300)
    # A crash loop: each Envoy dies a second after LIVE.
    assert [pacing.delay_after(1.0, now=t) for t in range(5)] == [0.0, 1.0, 2.0, 4.0, 8.0]
    # An Envoy that served a while is bad luck, not a loop, however recent the last one.
    assert pacing.delay_after(20.0, now=30) == 0.0
    assert pacing.delay_after(20.0, now=60) == 0.0
    # A quick death right after a stable one is the start of a loop...
    assert pacing.delay_after(0.5, now=61) == 1.0
    # ...but one long after the last death is a first death again.
    assert pacing.delay_after(0.5, now=10_000) == 0.0
