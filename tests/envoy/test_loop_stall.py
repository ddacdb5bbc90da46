"""The loop never stalls on a big config (issue 16): a hot restart onto a ~4 MB config,
which PyYAML takes seconds to parse, keeps every turn of the daemon's event loop short,
as its own `envoy_autoreload_loop_busy_max_seconds` says on /metrics; and the daemon
does not parse such a config itself, at start-up either."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from envoy_autoreload.references import WRITTEN_BY_ENVOY
from tests.envoy.conftest import EnvoyFamily
from tests.helpers import free_port, http_get, wait_until

ROUTES = 24_000  # ~4 MB of YAML
# Generous for a loaded 2-core box: a turn takes milliseconds, the parse seconds.
STALL_BOUND_S = 0.5
# The daemon runs in ~35-55 MiB; parsing the config in it took its peak to ~210 MiB.
PEAK_BOUND_MIB = 110
ROUTE = """\
                        - match: {{ path: "/service-{i:05d}/health" }}
                          direct_response: {{ status: 200, body: {{ inline_string: "{i}" }} }}
"""
ROUTES_AT = "                      routes:\n"


def big_config(family: EnvoyFamily, body: str) -> str:
    """The family's config serving `body` with ROUTES more direct-response routes, and
    an access log inside the watched directory (Envoy writes it: left out of the
    digest only if the daemon read the config)."""
    text = family.render(body, access_log=family.root / "access.log")
    assert text.count(ROUTES_AT) == 1
    routes = "".join(ROUTE.format(i=i) for i in range(ROUTES))
    return text.replace(ROUTES_AT, ROUTES_AT + routes)


def metric(port: int, name: str) -> float:
    """One sample of /metrics; the test fails when the daemon does not export it."""
    result = http_get(port, "/metrics")
    assert result is not None and result[0] == 200
    for line in result[1].splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"/metrics has no {name}")


def test_a_restart_onto_a_big_config_keeps_every_turn_of_the_loop_short(
    envoy_family: EnvoyFamily,
) -> None:
    envoy_family.write_config("v0")
    envoy_family.write_script()
    port = free_port()
    daemon = envoy_family.start(*envoy_family.watched("--status-address", f"127.0.0.1:{port}"))
    daemon.wait_event("child.serving", epoch=0)
    text = big_config(envoy_family, "v1")
    began = time.monotonic()
    yaml.load(text, Loader=yaml.CSafeLoader)
    parse_s = time.monotonic() - began
    assert parse_s > STALL_BOUND_S, "the positive control: this config is slow to parse"
    envoy_family.write_raw(text)
    daemon.wait_event("child.serving", epoch=1, timeout_s=120)
    wait_until(lambda: envoy_family.body() == "v1", timeout_s=30, what="v1 served")
    daemon.wait_event("child.exited", epoch=0, timeout_s=60)
    assert metric(port, "envoy_autoreload_loop_busy_seconds_count") > 0
    longest = metric(port, "envoy_autoreload_loop_busy_max_seconds")
    assert longest < STALL_BOUND_S, (
        f"a turn of the loop took {longest:.3f} s (parsing the config takes {parse_s:.2f} s)"
    )
    assert not daemon.events("config.parsed_in_loop")
    # What the config makes Envoy write was still left out, from the facts read off the
    # loop: the access log its validation created made no restart of its own.
    assert len(daemon.events("child.started")) == 2
    assert daemon.events("watch.referenced")[0]["excluded"] == [
        f"{envoy_family.root / 'access.log'}: {WRITTEN_BY_ENVOY}"
    ]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def test_a_big_first_config_is_parsed_beside_the_check_not_in_the_daemon(
    envoy_family: EnvoyFamily,
) -> None:
    """At start-up the config's facts (what to exclude, what to watch) come from the
    child the start-up check began: the daemon never builds the document itself, which
    for ~4 MB of YAML is well over a hundred MiB of Python objects at its peak."""
    envoy_family.write_raw(big_config(envoy_family, "v0"))
    envoy_family.write_script()
    daemon = envoy_family.start(*envoy_family.watched())
    daemon.wait_event("child.serving", epoch=0, timeout_s=120)
    peak = peak_rss_mib(daemon.pid)
    assert peak < PEAK_BOUND_MIB, f"the daemon's peak RSS was {peak:.0f} MiB"
    assert not daemon.events("config.parsed_in_loop")
    assert daemon.events("watch.referenced")[0]["excluded"] == [
        f"{envoy_family.root / 'access.log'}: {WRITTEN_BY_ENVOY}"
    ]
