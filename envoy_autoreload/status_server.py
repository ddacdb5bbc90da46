"""`--status-address`: GET /status (JSON), /metrics (Prometheus text), /healthz.

Runs in its own thread because an HTTP client must never stall the event loop; the
thread only reads the snapshot the loop publishes and the thread-safe metrics registry,
so it cannot block or change a restart. Nothing served over TCP changes anything: every
method but GET is refused. Loopback only unless the operator opts in, since /status names
PIDs and paths.

A client must not be able to spend the resources the daemon shares with Envoy (threads
count against the pod's pids limit, fds against nofile): each connection gets
HANDLER_TIMEOUT_S per read or write, and beyond MAX_CONNECTIONS at once a new one is
closed as soon as it is accepted. Rejected: serving from the event loop, which would
put HTTP parsing on the path of every restart decision.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from envoy_autoreload.logs import log_event
from envoy_autoreload.signal_mask import signals_blocked
from envoy_autoreload.status_address import MAX_CONNECTIONS, listen_status
from envoy_autoreload.telemetry import Telemetry

JSON_TYPE: Final = "application/json"
HANDLER_TIMEOUT_S: Final = 5.0

logger = logging.getLogger(__name__)


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS of them, on a socket already
    bound and listening: the previous image's (re-exec in place: scrapers see no gap),
    or the one start-up bound before Envoy started (`status_address.listen_status`)."""

    daemon_threads = True

    def __init__(
        self,
        listening: socket.socket,
        handler: type[BaseHTTPRequestHandler],
        max_connections: int,
    ) -> None:
        self.address_family = listening.family
        self._slots = threading.BoundedSemaphore(max_connections)
        host, port = listening.getsockname()[:2]
        super().__init__((host, port), handler, bind_and_activate=False)
        self.socket.close()
        self.socket = listening
        self.socket.set_inheritable(False)
        self.server_address = (host, port)
        self.server_name, self.server_port = str(host), int(port)

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: close at once, hold nothing
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError:  # "can't start new thread": the pids limit, shared with Envoy
            self._slots.release()
            self.shutdown_request(request)

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        """A client that resets or times out is routine: one DEBUG line, where
        socketserver would print a traceback into the daemon's log stream. Anything else
        is a bug in a handler, which ends only that request: one WARNING line."""
        error = sys.exc_info()[1]
        log_event(
            logger,
            logging.DEBUG if isinstance(error, OSError) else logging.WARNING,
            "status.request_failed",
            " ".join(f"{type(error).__name__}: {error}".split()),
            client=str(client_address),
        )


class StatusServer:
    def __init__(
        self, address: tuple[str, int], telemetry: Telemetry, listening_fd: int | None = None
    ) -> None:
        """`listening_fd`: bound already (see `_BoundedHTTPServer`); else `address` is."""
        if listening_fd is not None:
            listening = socket.socket(fileno=listening_fd)
        else:
            listening = listen_status(address)
        self._server = _BoundedHTTPServer(listening, _handler_for(telemetry), MAX_CONNECTIONS)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="status-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def fileno(self) -> int:
        return self._server.socket.fileno()

    def start(self) -> None:
        with signals_blocked():
            self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler_for(telemetry: Telemetry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "envoy-autoreload"
        # Per blocking read or write: a silent or slow client gives its thread back.
        timeout = HANDLER_TIMEOUT_S

        def do_GET(self) -> None:
            snapshot = telemetry.snapshot
            path = self.path.split("?", 1)[0]
            if path == "/status":
                self._send(200, JSON_TYPE, json.dumps(snapshot, indent=2).encode() + b"\n")
            elif path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(telemetry.registry))
            elif path == "/healthz":
                serving = snapshot.get("serving")
                code = 200 if serving else 503
                self._send(code, "text/plain", b"serving\n" if serving else b"no Envoy serves\n")
            else:
                self._send(404, "text/plain", b"not found: /status, /metrics, /healthz\n")

        def _refuse(self) -> None:
            self._send(405, "text/plain", b"read-only: GET /status, /metrics, /healthz\n")

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # access logs would drown the event log; Prometheus scrapes every few s

    return Handler
