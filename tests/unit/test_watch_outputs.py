"""`paths_envoy_writes`: the files an Envoy bootstrap's access loggers write (review #15)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from envoy_autoreload.envoy_outputs import paths_envoy_writes

FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"

BOOTSTRAP = f"""
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 9901}}}}
  access_log:
  - name: envoy.access_loggers.file
    typed_config: {{"@type": "{FILE_LOG}", path: logs/admin.log}}
  - name: envoy.access_loggers.stdout
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
static_resources:
  listeners:
  - name: web
    address: {{socket_address: {{address: 127.0.0.1, port_value: 10000}}}}
    access_log:
    - name: listener_log
      typed_config: {{"@type": "{FILE_LOG}", path: /var/log/envoy/listener.log}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}.HttpConnectionManager
          stat_prefix: web
          access_log:
          - name: envoy.access_loggers.file
            typed_config: {{"@type": "{FILE_LOG}", path: ./logs/../logs/access.log}}
          - name: to_stdout
            typed_config: {{"@type": "{FILE_LOG}", path: /dev/stdout}}
          - name: to_stderr
            typed_config: {{"@type": "{FILE_LOG}", path: /dev/stderr}}
          - name: wrapped
            typed_config:
              "@type": type.googleapis.com/xds.type.v3.TypedStruct
              type_url: {FILE_LOG}
              value: {{path: /var/log/envoy/wrapped.log}}
          route_config: {{name: r, virtual_hosts: []}}
"""


def _load(text: str) -> dict[str, Any]:
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


def test_every_file_access_logger_is_found_relative_paths_from_base(tmp_path: Path) -> None:
    found = paths_envoy_writes(_load(BOOTSTRAP), tmp_path)
    assert found == {
        tmp_path / "logs" / "admin.log",
        tmp_path / "logs" / "access.log",
        Path("/var/log/envoy/listener.log"),
        Path("/var/log/envoy/wrapped.log"),
    }
    assert all(path.is_absolute() for path in found)


def test_the_legacy_admin_access_log_path(tmp_path: Path) -> None:
    config = {"admin": {"access_log_path": "/tmp/admin_access.log"}}
    assert paths_envoy_writes(config, tmp_path) == {Path("/tmp/admin_access.log")}
    assert paths_envoy_writes({"admin": {"access_log_path": "/dev/null"}}, tmp_path) == set()


def test_a_bootstrap_without_file_loggers_names_nothing(tmp_path: Path) -> None:
    assert paths_envoy_writes({}, tmp_path) == set()
    odd: dict[str, object] = {
        "admin": "not a mapping",
        "static_resources": {"listeners": [None, 3, "x", {"typed_config": "nope"}]},
        "stats_sinks": [{"typed_config": {"@type": FILE_LOG}}],  # no path
        "other": [{"typed_config": {"@type": FILE_LOG, "path": 7}}],
    }
    assert paths_envoy_writes(odd, tmp_path) == set()


def test_yaml_aliases_and_self_references_end(tmp_path: Path) -> None:
    """PyYAML builds shared and self-referencing objects from anchors; the walk ends."""
    text = f"""
log: &log {{name: f, typed_config: {{"@type": "{FILE_LOG}", path: a.log}}}}
listeners: [{{access_log: [*log]}}, {{access_log: [*log]}}]
loop: &loop [*loop]
"""
    assert paths_envoy_writes(_load(text), tmp_path) == {tmp_path / "a.log"}


def test_a_deeply_nested_document_does_not_recurse(tmp_path: Path) -> None:
    node: dict[str, object] = {"typed_config": {"@type": FILE_LOG, "path": "deep.log"}}
    for _ in range(5000):
        node = {"x": [node]}
    assert paths_envoy_writes(node, tmp_path) == {tmp_path / "deep.log"}
