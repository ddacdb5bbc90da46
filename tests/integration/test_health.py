"""The health prober against real local HTTP servers: URLs, admin, rounds, and a loop
side that never blocks."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, cast

import pytest

from envoy_autoreload.addresses import AdminAddress
from envoy_autoreload.admin import parse_counter
from envoy_autoreload.health import (
    ROUND_STATS_PATH,
    HealthObservation,
    HealthProber,
    UrlResult,
    parse_health_url,
)

if TYPE_CHECKING:
    from envoy_autoreload.roster import Generation

TIMEOUT_S = 0.3  # the prober's per-check timeout in these tests
TAKE_BUDGET_S = 0.05  # what the loop side may spend in take(); it should never wait


@dataclass(frozen=True)
class FakeGen:
    epoch: int
    pid: int


def gen(epoch: int, pid: int = 4242) -> Generation:
    return cast("Generation", FakeGen(epoch, pid))


@dataclass
class Route:
    status: int = 200
    body: bytes = b"ok\n"
    hang: bool = False  # answer only once the server closes
    delay_s: float = 0.0  # answer this late (an admin with many stats to walk)


@dataclass
class FakeServer:
    """A ThreadingHTTPServer on 127.0.0.1 (kernel-picked port) with canned routes."""

    routes: dict[str, Route] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    clients: set[int] = field(default_factory=set)  # client ports: one per connection
    release: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.server = _Server(("127.0.0.1", 0), _handler_for(self))
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-http")
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.release.set()  # hanging handlers answer (to nobody) and end
        self.server.shutdown()
        self.server.server_close()  # joins the handler threads
        self.thread.join()


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins them: no thread outlives the test

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that timed out and left is expected here


def _handler_for(fake: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's admin

        def do_GET(self) -> None:
            fake.hits[self.path] += 1
            fake.clients.add(self.client_address[1])
            route = fake.routes.get(self.path, Route(404, b"no route\n"))
            if route.hang:
                fake.release.wait(30)
            fake.release.wait(route.delay_s)
            with contextlib.suppress(OSError):
                self.send_response(route.status)
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                self.wfile.write(route.body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port bound but not listening: connecting to it is refused, and nothing else can
    take it meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@contextlib.contextmanager
def prober(
    urls: tuple[str, ...], admin: AdminAddress | None = None, timeout_s: float = TIMEOUT_S
) -> Iterator[HealthProber]:
    p = HealthProber(urls, lambda _gen: admin, timeout_s=timeout_s)
    try:
        yield p
    finally:
        p.close()


def take_now(p: HealthProber) -> HealthObservation | None:
    started = time.monotonic()
    result = p.take()
    assert time.monotonic() - started < TAKE_BUDGET_S, "take() blocked the loop"
    return result


def next_observation(p: HealthProber, timeout_s: float = 5.0) -> HealthObservation:
    """Wait the way the loop does: select on fileno() with a deadline, then take()."""
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([p], [], [], remaining)
        if readable and (observation := take_now(p)) is not None:
            return observation
    raise AssertionError(f"no observation within {timeout_s:g} s")


def assert_quiet(p: HealthProber, duration_s: float) -> None:
    """Nothing becomes readable for `duration_s` (the window a "nothing" claim needs)."""
    readable, _, _ = select.select([p], [], [], duration_s)
    assert not readable, f"an observation arrived: {take_now(p)}"


# -- URLs -------------------------------------------------------------------------------


def test_a_2xx_url_is_ok_and_a_503_is_not(server: FakeServer) -> None:
    server.routes["/ready"] = Route(200)
    server.routes["/made?x=1"] = Route(204, b"")
    server.routes["/bad"] = Route(503)
    urls = (server.url("/ready"), server.url("/made?x=1"), server.url("/bad"))
    with prober(urls) as p:
        p.begin_round(gen(3, pid=77))
        observation = next_observation(p)
    assert (observation.epoch, observation.pid) == (3, 77)
    assert observation.urls == (
        UrlResult(urls[0], True, "HTTP 200"),
        UrlResult(urls[1], True, "HTTP 204"),
        UrlResult(urls[2], False, "HTTP 503"),
    )
    assert server.hits == {"/ready": 1, "/made?x=1": 1, "/bad": 1}


def test_a_refused_port_is_not_ok(refused_port: int) -> None:
    url = f"http://127.0.0.1:{refused_port}/ready"
    with prober((url,)) as p:
        p.begin_round(gen(1))
        observation = next_observation(p)
    assert observation.urls == (UrlResult(url, False, "connection refused"),)


def test_a_hung_url_times_out_and_the_loop_never_waits(server: FakeServer) -> None:
    server.routes["/hang"] = Route(hang=True)
    server.routes["/ready"] = Route(200)
    urls = (server.url("/hang"), server.url("/ready"))
    with prober(urls) as p:
        p.begin_round(gen(1))
        assert take_now(p) is None, "nothing is finished yet"
        assert_quiet(p, TIMEOUT_S / 2)  # still hanging: the pipe stays unreadable
        assert take_now(p) is None
        observation = next_observation(p)
        assert take_now(p) is None, "an observation is taken once"
    assert observation.urls == (
        UrlResult(urls[0], False, "timed out after 0.3 s"),
        UrlResult(urls[1], True, "HTTP 200"),
    )


def test_a_round_begun_while_one_runs_is_skipped(server: FakeServer) -> None:
    server.routes["/hang"] = Route(hang=True)
    with prober((server.url("/hang"),)) as p:
        p.begin_round(gen(1))
        assert p.is_busy()
        p.begin_round(gen(2))  # skipped: not queued behind the first
        assert next_observation(p).epoch == 1
        assert_quiet(p, TIMEOUT_S * 2)
        assert server.hits["/hang"] == 1
        assert not p.is_busy()
        p.begin_round(gen(2))  # once the round is over, the next one runs
        assert next_observation(p).epoch == 2
    assert server.hits["/hang"] == 2


def test_close_during_a_hung_check_does_not_wait_long(server: FakeServer) -> None:
    server.routes["/hang"] = Route(hang=True)
    p = HealthProber((server.url("/hang"),), lambda _gen: None, timeout_s=TIMEOUT_S)
    p.begin_round(gen(1))
    started = time.monotonic()
    p.close()
    assert time.monotonic() - started < TIMEOUT_S + 0.6
    p.close()  # twice is harmless
    assert p.take() is None
    p.begin_round(gen(2))  # ignored once closed


def test_close_before_any_round() -> None:
    p = HealthProber((), lambda _gen: None)
    p.close()


# -- admin ------------------------------------------------------------------------------


def _admin_routes(
    server: FakeServer, ready: tuple[int, str], stats: str, info: object = None
) -> AdminAddress:
    server.routes["/ready"] = Route(ready[0], ready[1].encode())
    server.routes[ROUND_STATS_PATH] = Route(200, stats.encode())
    if info is not None:
        server.routes["/server_info"] = Route(200, json.dumps(info).encode())
    return AdminAddress("127.0.0.1", server.port)


def test_admin_state_epoch_and_listener_failures_over_one_connection(
    server: FakeServer,
) -> None:
    stats = "listener_manager.listener_create_failure: 3\nserver.hot_restart_epoch: 2\n"
    admin = _admin_routes(server, (200, "LIVE\n"), stats)
    with prober((), admin) as p:
        p.begin_round(gen(2))
        observation = next_observation(p)
    assert observation == HealthObservation(2, 4242, "LIVE", 2, 3, ())
    assert server.hits == {"/ready": 1, ROUND_STATS_PATH: 1}, "no 124 KB /server_info"
    assert len(server.clients) == 1, "one process must answer both (ENVOY_FACTS §9)"


def test_a_counter_left_out_by_usedonly_is_zero(server: FakeServer) -> None:
    """`usedonly` omits a counter never incremented; the epoch gauge beside it shows the
    stats were read, so the counter is 0 (a baseline), not unknown."""
    admin = _admin_routes(server, (200, "LIVE\n"), "server.hot_restart_epoch: 2\n")
    with prober((), admin) as p:
        p.begin_round(gen(2))
        assert next_observation(p).listener_create_failures == 0
    assert "usedonly" in ROUND_STATS_PATH


def test_dear_stats_are_asked_at_most_a_twentieth_of_the_time(server: FakeServer) -> None:
    """An admin that takes long over `/stats` (tens of thousands of clusters) is asked
    for them again only after 19 times that; the rounds between read state and epoch
    from `/server_info`. A cheap answer is asked every round, and a new generation at
    once."""
    stats = "listener_manager.listener_create_failure: 1\nserver.hot_restart_epoch: 2\n"
    admin = _admin_routes(server, (200, "LIVE\n"), stats, _INFO_LIVE_2)
    with prober((), admin) as p:
        for _ in range(2):
            p.begin_round(gen(2))
            assert next_observation(p).listener_create_failures == 1
            time.sleep(0.5)  # as probation spaces rounds; a cheap answer rests far less
        assert server.hits[ROUND_STATS_PATH] == 2 and server.hits["/server_info"] == 0
        server.routes[ROUND_STATS_PATH].delay_s = 0.1
        p.begin_round(gen(2))
        assert next_observation(p).listener_create_failures == 1
        p.begin_round(gen(2))
        assert next_observation(p) == HealthObservation(2, 4242, "LIVE", 2, None, ())
        assert server.hits[ROUND_STATS_PATH] == 3 and server.hits["/server_info"] == 1
        p.begin_round(gen(2, pid=4343))
        dear_at = time.monotonic()
        assert next_observation(p).listener_create_failures == 1, "a new generation: asked"
        deadline = time.monotonic() + 10
        while server.hits[ROUND_STATS_PATH] < 5 and time.monotonic() < deadline:
            p.begin_round(gen(2, pid=4343))
            next_observation(p)
            time.sleep(0.05)  # a poll's interval
    assert server.hits[ROUND_STATS_PATH] == 5, "asked again once its rest is over"
    assert time.monotonic() - dear_at >= 0.1 * 19


_INFO_LIVE_2 = {"state": "LIVE", "command_line_options": {"restart_epoch": 2}}


def test_the_windows_last_rounds_read_the_counter_while_stats_rest(server: FakeServer) -> None:
    """A listener failure in the window's last stretch would pass probation unseen while
    a dear `/stats` rests: a `final` round asks for the counter all the same."""
    stats = "listener_manager.listener_create_failure: 1\nserver.hot_restart_epoch: 2\n"
    admin = _admin_routes(server, (200, "LIVE\n"), stats, _INFO_LIVE_2)
    server.routes[ROUND_STATS_PATH].delay_s = 0.1
    with prober((), admin) as p:
        p.begin_round(gen(2))
        assert next_observation(p).listener_create_failures == 1
        p.begin_round(gen(2))
        assert next_observation(p).listener_create_failures is None, "rests"
        server.routes[ROUND_STATS_PATH].body = stats.replace(": 1", ": 2").encode()
        p.begin_round(gen(2), final=True)
        assert next_observation(p).listener_create_failures == 2
    assert server.hits[ROUND_STATS_PATH] == 2 and server.hits["/server_info"] == 1


def test_a_starting_envoy_is_its_ready_state_whatever_its_state_gauge_says(
    server: FakeServer,
) -> None:
    """`server.state` read 0 (LIVE) in a child still PRE_INITIALIZING: not asked."""
    stats = "server.hot_restart_epoch: 1\nserver.state: 0\n"
    admin = _admin_routes(server, (503, "PRE_INITIALIZING\n"), stats)
    with prober((), admin) as p:
        p.begin_round(gen(1))
        observation = next_observation(p)
    assert (observation.admin_state, observation.admin_epoch) == ("PRE_INITIALIZING", 1)


def test_without_the_epoch_gauge_server_info_says_it(server: FakeServer) -> None:
    """A stats matcher that drops `server.*` (or an admin without `/ready`): the round
    asks `/server_info` as before rather than report no epoch."""
    info = {"state": "DRAINING", "command_line_options": {"restart_epoch": 1}}
    admin = _admin_routes(server, (503, "DRAINING"), "some.other.stat: 7\n", info)
    with prober((), admin) as p:
        p.begin_round(gen(1))
        observation = next_observation(p)
    assert (observation.admin_state, observation.admin_epoch) == ("DRAINING", 1)
    assert observation.listener_create_failures is None
    assert server.hits["/server_info"] == 1
    del server.routes["/ready"]
    server.routes[ROUND_STATS_PATH] = Route(200, b"server.hot_restart_epoch: 1\n")
    with prober((), admin) as p:
        p.begin_round(gen(1))
        assert next_observation(p).admin_state == "DRAINING"
    assert server.hits["/server_info"] == 2


def test_a_silent_admin_is_none_and_asked_once(refused_port: int, server: FakeServer) -> None:
    with prober((), AdminAddress("127.0.0.1", refused_port)) as p:
        p.begin_round(gen(1))
        observation = next_observation(p)
    assert observation == HealthObservation(1, 4242, None, None, None, ())
    server.routes["/ready"] = Route(hang=True)
    with prober((), AdminAddress("127.0.0.1", server.port)) as p:
        p.begin_round(gen(1))
        observation = next_observation(p)
    assert observation == HealthObservation(1, 4242, None, None, None, ())
    assert server.hits == {"/ready": 1}, "a hung admin is waited for once a round, not twice"


def test_no_admin_address_leaves_admin_fields_none(server: FakeServer) -> None:
    server.routes["/ready"] = Route(200)
    with prober((server.url("/ready"),), admin=None) as p:
        p.begin_round(gen(5))
        observation = next_observation(p)
    assert (observation.admin_state, observation.admin_epoch) == (None, None)
    assert observation.listener_create_failures is None
    assert observation.urls[0].ok


def test_parse_counter() -> None:
    text = "cluster.x.upstream_rq: 9\nlistener_manager.listener_create_failure: 12\n"
    assert parse_counter(text, "listener_manager.listener_create_failure") == 12
    assert parse_counter("listener_manager.listener_create_failure: ?\n", "x") is None
    assert parse_counter("", "listener_manager.listener_create_failure") is None


# -- parse_health_url -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://127.0.0.1:8080/ready", "http://127.0.0.1:8080/ready"),
        ("http://localhost/healthz?full=1", "http://localhost/healthz?full=1"),
        ("HTTP://example.internal:81/a/b", "http://example.internal:81/a/b"),
        ("http://[::1]:9901/ready", "http://[::1]:9901/ready"),
        ("http://localhost:8080", "http://localhost:8080/"),
    ],
)
def test_parse_health_url_accepts(text: str, expected: str) -> None:
    assert parse_health_url(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("https://127.0.0.1/ready", "https is not supported"),
        ("ftp://host/x", "is not http://HOST[:PORT]/PATH"),
        ("127.0.0.1:8080/ready", "is not http://HOST[:PORT]/PATH"),
        ("http:///ready", "is not http://HOST[:PORT]/PATH"),
        ("http://host:99999/ready", "is not http://HOST[:PORT]/PATH"),
        ("http://host:port/ready", "is not http://HOST[:PORT]/PATH"),
        ("http://host:0/ready", "port 0"),
        ("http://user:pw@host/ready", "credentials"),
        ("http://host/ready#top", "fragment"),
        ("http://host/re ady", "whitespace"),
        ("", "is not http://HOST[:PORT]/PATH"),
    ],
)
def test_parse_health_url_refuses(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_health_url(text)
    message = str(caught.value)
    assert reason in message
    assert "\n" not in message
