"""`--status-address`: GET /status (JSON), /metrics (Prometheus text), /healthz.

Runs in its own thread because an HTTP client must never stall the event loop; the
thread only reads the snapshot the loop publishes and the thread-safe metrics registry,
so it cannot block or change a restart. Nothing served over TCP changes anything: every
method but GET is refused. Loopback only unless the operator opts in, since /status names
PIDs and paths.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from envoy_autoreload.errors import UsageError
from envoy_autoreload.telemetry import Telemetry

JSON_TYPE: Final = "application/json"


def parse_status_address(text: str, *, allow_remote: bool) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"status address {text!r} is not HOST:PORT")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not allow_remote:
        raise UsageError(
            f"status address {text} is not a loopback address: /status names PIDs and paths; "
            "give --status-allow-remote to serve it beyond this host"
        )
    return host, int(port)


class StatusServer:
    def __init__(self, address: tuple[str, int], telemetry: Telemetry) -> None:
        handler = _handler_for(telemetry)
        try:
            self._server = ThreadingHTTPServer(address, handler)
        except OSError as err:
            raise UsageError(
                f"cannot serve status on {address[0]}:{address[1]}: {err.strerror}"
            ) from err
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="status-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler_for(telemetry: Telemetry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "envoy-autoreload"

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
