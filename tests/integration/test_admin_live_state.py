"""The LIVE probe's admin question (`admin.fetch_live_state`, issue 16): `/ready` first,
and `/server_info` (124 KB, 1.6 ms of the answering Envoy's main thread) only when it
says LIVE, on the same fresh connection, so that one process answers both (§9, §15)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from envoy_autoreload.addresses import AdminAddress
from envoy_autoreload.admin import fetch_live_state

SERVER_INFO = {
    "state": "LIVE",
    "version": "abc/1.40.0/Clean/RELEASE/BoringSSL",
    "hot_restart_version": "11.104",
    "command_line_options": {"restart_epoch": 3},
}


class FakeAdmin(ThreadingHTTPServer):
    """Answers `/ready` with `ready` (status, body); records (client port, path)."""

    # server_close() joins the handler threads: a keep-alive handler still reading the
    # client's EOF would otherwise outlive the test (a CI run caught it in teardown).
    daemon_threads = False

    def __init__(self, ready: tuple[int, str]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.ready = ready
        self.seen: list[tuple[int, str]] = []

    @property
    def address(self) -> AdminAddress:
        return AdminAddress("127.0.0.1", self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's admin
    timeout = 10  # a client that never closes cannot hold the teardown's join forever

    def do_GET(self) -> None:
        server = self.server
        assert isinstance(server, FakeAdmin)
        server.seen.append((self.client_address[1], self.path))
        if self.path == "/ready":
            status, text = server.ready
        elif self.path == "/server_info":
            status, text = 200, json.dumps(SERVER_INFO)
        else:
            status, text = 404, "not found"
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def admin(request: pytest.FixtureRequest) -> Iterator[FakeAdmin]:
    server = FakeAdmin(request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.mark.parametrize("admin", [(503, "PRE_INITIALIZING\n")], indirect=True)
def test_not_live_yet_costs_only_ready(admin: FakeAdmin) -> None:
    info = fetch_live_state(admin.address)
    assert info is not None and info.state == "PRE_INITIALIZING" and info.restart_epoch is None
    assert [path for _port, path in admin.seen] == ["/ready"]


@pytest.mark.parametrize("admin", [(200, "LIVE\n"), (404, "no /ready here")], indirect=True)
def test_live_or_unknown_asks_server_info_on_the_same_connection(admin: FakeAdmin) -> None:
    info = fetch_live_state(admin.address)
    assert info is not None and (info.state, info.restart_epoch) == ("LIVE", 3)
    assert info.hot_restart_version == "11.104"
    assert [path for _port, path in admin.seen] == ["/ready", "/server_info"]
    ports = {port for port, _path in admin.seen}
    assert len(ports) == 1, "one connection: the process that said LIVE is the one asked"


def test_nothing_listening_is_no_answer() -> None:
    server = FakeAdmin((200, "LIVE\n"))
    address = server.address
    server.server_close()
    assert fetch_live_state(address, timeout_s=1) is None
