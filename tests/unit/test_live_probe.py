"""The LIVE probe's /server_info off the loop: an answer that comes at once is taken at
once; one that is slow holds the caller at most the wait, and is taken by a later
probe; each answer is taken once; the thread has our signals blocked."""

from __future__ import annotations

import select
import signal
import threading
import time

from envoy_autoreload.addresses import AdminAddress
from envoy_autoreload.admin import ServerInfo
from envoy_autoreload.live_probe import ServerInfoAsker
from envoy_autoreload.signal_mask import SIGNAL_PRIORITY
from tests.helpers import wait_until

ADMIN = AdminAddress("127.0.0.1", 9901)
LIVE = ServerInfo("LIVE", 1, "1.40.0", "11.104", False)


def answered(asker: ServerInfoAsker, key: str) -> tuple[bool, ServerInfo | None]:
    """Probe as the launcher does, until an answer comes."""

    def probe() -> tuple[bool, ServerInfo | None] | None:
        result = asker.ask(key, ADMIN)
        return result if result[0] else None

    result = wait_until(probe, timeout_s=10, what=f"{key}'s answer")
    requests_end()
    return result


def requests_end() -> None:
    """A request's thread ends just after its answer is out: wait for that."""
    wait_until(
        lambda: not any(t.name == "envoy-autoreload-live-probe" for t in threading.enumerate()),
        timeout_s=10,
        what="the request's thread to end",
    )


class FakeAdmin:
    """Answers LIVE once released (at once when `slow` is False); counts the requests."""

    def __init__(self, slow: bool) -> None:
        self.release = threading.Event()
        if not slow:
            self.release.set()
        self.requests = 0
        self.blocked: set[int] = set()

    def __call__(self, address: AdminAddress) -> ServerInfo | None:
        self.requests += 1
        self.blocked = set(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        assert self.release.wait(30)
        return LIVE


def test_a_quick_answer_is_taken_at_once_and_only_once() -> None:
    admin = FakeAdmin(slow=False)
    asker = ServerInfoAsker(admin, wait_s=10)
    assert asker.ask("gen1", ADMIN) == (True, LIVE)
    assert asker.ask("gen1", ADMIN) == (True, LIVE)
    assert admin.requests == 2, "each probe asks afresh"
    assert set(SIGNAL_PRIORITY) <= admin.blocked, "our signals stay with the main thread"
    requests_end()


def test_the_probe_never_waits_and_the_answer_rings_the_loop() -> None:
    """Issue 16, goal 5: a 20 ms wait for the answer held a loaded loop 60 ms. The
    probe returns at once; the answer makes the pipe the loop watches readable."""
    admin = FakeAdmin(slow=True)
    asker = ServerInfoAsker(admin)
    bell = asker.fileno()
    try:
        began = time.monotonic()
        assert asker.ask("gen1", ADMIN) == (False, None)
        assert time.monotonic() - began < 0.5, "no wait for the answer"
        assert select.select([bell], [], [], 0)[0] == [], "no answer, no ring"
        admin.release.set()
        readable, _, _ = select.select([bell], [], [], 10)
        assert readable == [bell], "the answer rings"
        asker.drain()
        assert select.select([bell], [], [], 0)[0] == [], "the ring was taken"
        assert asker.ask("gen1", ADMIN) == (True, LIVE)
        requests_end()
    finally:
        asker.close()


def test_a_slow_answer_holds_the_loop_only_for_the_wait() -> None:
    admin = FakeAdmin(slow=True)
    asker = ServerInfoAsker(admin, wait_s=0.02)
    began = time.monotonic()
    assert asker.ask("gen1", ADMIN) == (False, None)
    assert time.monotonic() - began < 5, "bounded by the wait, not by the request"
    assert asker.ask("gen1", ADMIN) == (False, None)
    assert admin.requests == 1, "still the first request: not asked twice"
    admin.release.set()
    assert answered(asker, "gen1") == (True, LIVE)
    assert admin.requests == 1, "the answer a later probe took is the first request's"


def test_another_generation_waits_for_the_request_in_flight() -> None:
    admin = FakeAdmin(slow=True)
    asker = ServerInfoAsker(admin, wait_s=0.01)
    assert asker.ask("gen1", ADMIN) == (False, None)
    assert asker.ask("gen2", ADMIN) == (False, None), "gen1's request is still out"
    admin.release.set()
    assert answered(asker, "gen2") == (True, LIVE)
    assert admin.requests == 2, "gen1's answer, never taken, was dropped"
