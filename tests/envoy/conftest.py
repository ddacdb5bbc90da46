"""A real Envoy family per test: its own base id, free ports, and a cleanup that always runs."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conformance_scenarios import SLOW_INIT_S
from tests.daemon import Daemon, start_daemon
from tests.helpers import allocate_base_id, free_port, http_get

ENVOY_BIN = Path(sys.executable).parent / "envoy"

CONFIG_TEMPLATE = """\
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}
static_resources:
  listeners:
{listeners}
  clusters:
    - name: known
      connect_timeout: 1s
      type: STATIC
      load_assignment:
        cluster_name: known
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}
"""

LISTENER_TEMPLATE = """\
    - name: {name}
      address:
        socket_address: {{ address: 127.0.0.1, port_value: {port} }}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": {hcm_type}
                stat_prefix: {name}
{access_log}                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: {{ prefix: "/" }}
                          direct_response:
                            status: 200
                            body: {{ inline_string: "{body}" }}
"""

ACCESS_LOG_TEMPLATE = """\
                access_log:
                  - name: envoy.access_loggers.file
                    typed_config:
                      "@type": {file_log_type}
                      path: {path}
"""

HCM_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
FILE_LOG_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"

START_SCRIPT = """\
#!/bin/sh
default_config={config}
{prelude}exec {envoy} -c {config_arg} \\
    --restart-epoch "$RESTART_EPOCH" --base-id {base_id} \\
    --drain-time-s 1 --parent-shutdown-time-s {parent_shutdown_s} --file-flush-interval-msec 100 \\
    --log-level info
"""


@dataclass
class EnvoyFamily:
    """One test's Envoy: config and start script in its own directory."""

    root: Path
    base_id: int = field(default_factory=allocate_base_id)
    admin_port: int = field(default_factory=free_port)
    listener_port: int = field(default_factory=free_port)
    daemons: list[Daemon] = field(default_factory=list)
    config_name: str = "envoy.yaml"  # relative to root; may name a subdirectory

    @property
    def config(self) -> Path:
        return self.root / self.config_name

    def watched(self, *extra: str) -> list[str]:
        """Arguments for the daemon to watch the config's directory and validate it."""
        return ["--watch", str(self.config.parent), "--config", str(self.config), *extra]

    @property
    def script(self) -> Path:
        return self.root / "start_envoy.sh"

    @property
    def shm(self) -> Path:
        return Path(f"/dev/shm/envoy_shared_memory_{self.base_id * 10}")

    def write_config(
        self,
        body: str,
        *,
        extra_listener_port: int | None = None,
        access_log: Path | None = None,
    ) -> None:
        """Write the config atomically (rename over), as an editor or config push would."""
        self.write_raw(
            self.render(body, extra_listener_port=extra_listener_port, access_log=access_log)
        )

    def render(
        self,
        body: str,
        *,
        extra_listener_port: int | None = None,
        access_log: Path | None = None,
    ) -> str:
        """The config text whose listener answers `body`."""
        log_block = (
            ACCESS_LOG_TEMPLATE.format(path=access_log, file_log_type=FILE_LOG_TYPE)
            if access_log
            else ""
        )
        listeners = [
            LISTENER_TEMPLATE.format(
                name="main",
                port=self.listener_port,
                body=body,
                access_log=log_block,
                hcm_type=HCM_TYPE,
            )
        ]
        if extra_listener_port is not None:
            listeners.append(
                LISTENER_TEMPLATE.format(
                    name="extra",
                    port=extra_listener_port,
                    body=body,
                    access_log="",
                    hcm_type=HCM_TYPE,
                )
            )
        return CONFIG_TEMPLATE.format(admin_port=self.admin_port, listeners="".join(listeners))

    def write_raw(self, text: str) -> None:
        self.config.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config)

    def write_script(
        self, prelude: str = "", parent_shutdown_s: int = 2, *, snapshot: bool = True
    ) -> None:
        """`snapshot=False`: a drop-in script that starts the file on disk and ignores
        $ENVOY_AUTORELOAD_SNAPSHOT (exact start and rollback are then off)."""
        config_arg = (
            '"${ENVOY_AUTORELOAD_SNAPSHOT:-$default_config}"' if snapshot else '"$default_config"'
        )
        self.script.write_text(
            START_SCRIPT.format(
                prelude=prelude,
                config_arg=config_arg,
                envoy=ENVOY_BIN,
                config=shlex.quote(str(self.config)),
                base_id=self.base_id,
                parent_shutdown_s=parent_shutdown_s,
            )
        )
        self.script.chmod(0o755)

    def body(self) -> str | None:
        """The listener's body over a fresh connection, or None if it does not answer."""
        result = http_get(self.listener_port)
        return result[1] if result is not None and result[0] == 200 else None

    def server_info(self) -> dict[str, Any] | None:
        result = http_get(self.admin_port, "/server_info")
        if result is None or result[0] != 200:
            return None
        info: dict[str, Any] = json.loads(result[1])
        return info

    def start(
        self, *extra_args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> Daemon:
        return self.start_script(self.script, *extra_args, env=env, prefix=prefix)

    def start_script(
        self,
        script: Path,
        *extra_args: str,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
        cwd: Path | None = None,
    ) -> Daemon:
        # Beside the family's directory, not in it: tests watch that directory, and a
        # log inside it would be a content change at every line.
        log = self.root.parent / f"{self.root.name}.daemon{len(self.daemons)}.log"
        daemon = start_daemon([*extra_args, str(script)], log, env=env, prefix=prefix, cwd=cwd)
        self.daemons.append(daemon)
        return daemon

    def our_processes(self) -> list[int]:
        """PIDs of any process whose command line names this family's base id."""
        needle = f"--base-id\0{self.base_id}\0".encode()
        pids: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if needle in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def cleanup(self) -> list[int]:
        for daemon in self.daemons:
            daemon.stop()
        leaked = self.our_processes()
        for pid in leaked:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.shm.unlink(missing_ok=True)
        return leaked


MakeFamily = Callable[..., EnvoyFamily]


@pytest.fixture
def make_envoy_family(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MakeFamily]:
    """Families serving "v0", each cleaned up however the test ends; keyword arguments
    go to EnvoyFamily (a `config_name` in a subdirectory, with spaces, ...). The first
    family lives in `tmp_path`; each later one in a fresh directory of its own (never
    inside the first, which a test may be watching)."""
    assert ENVOY_BIN.exists(), f"real Envoy expected at {ENVOY_BIN} (pip install -e '.[test]')"
    families: list[EnvoyFamily] = []

    def make(**kwargs: Any) -> EnvoyFamily:
        root = tmp_path_factory.mktemp(f"{tmp_path.name}-family") if families else tmp_path
        family = EnvoyFamily(root, **kwargs)
        families.append(family)
        family.write_config("v0")
        family.write_script()
        return family

    try:
        yield make
    finally:
        leaked = [pid for family in families for pid in family.cleanup()]
    assert not leaked, f"Envoy processes outlived the daemon: {leaked}"


@pytest.fixture
def envoy_family(make_envoy_family: MakeFamily) -> EnvoyFamily:
    return make_envoy_family()


def slow_to_initialize(config: str, xds_port: int) -> str:
    """`config` plus CDS from an xDS server on a port where nothing listens: Envoy stays
    PRE_INITIALIZING until `initial_fetch_timeout` (ENVOY_FACTS §8, §15)."""
    return config + (
        "    - name: xds\n"
        "      connect_timeout: 1s\n"
        "      type: STATIC\n"
        "      typed_extension_protocol_options:\n"
        "        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n"
        '          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3'
        ".HttpProtocolOptions\n"
        "          explicit_http_config: { http2_protocol_options: {} }\n"
        "      load_assignment:\n"
        "        cluster_name: xds\n"
        "        endpoints:\n"
        "          - lb_endpoints:\n"
        "              - endpoint:\n"
        "                  address:\n"
        f"                    socket_address: {{ address: 127.0.0.1, port_value: {xds_port} }}\n"
        "node: { id: conformance, cluster: conformance }\n"
        "dynamic_resources:\n"
        "  cds_config:\n"
        "    resource_api_version: V3\n"
        f"    initial_fetch_timeout: {SLOW_INIT_S:g}s\n"
        "    api_config_source:\n"
        "      api_type: GRPC\n"
        "      transport_api_version: V3\n"
        "      grpc_services:\n"
        "        - envoy_grpc: { cluster_name: xds }\n"
    )
