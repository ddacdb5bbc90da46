"""examples/kubernetes under `podman kube play` (README "Run it on Kubernetes").

The manifests are played as they are, but for what podman needs or does differently
(each one said where it is done, in `_podman_copy`):
- the image is this session's build, and one replica (podman makes one pod);
- the Deployment and ConfigMap get this test's names (podman's volumes are global);
- `ports:` is dropped: podman publishes every containerPort on the host's 0.0.0.0,
  which Kubernetes does not do (the pod IP is reached from inside the pod's network
  namespace here);
- podman writes a ConfigMap volume as plain files, the kubelet as `..<timestamp>/`
  directories behind a `..data` symlink: before the pod starts (`--start=false`), the
  volume is given the kubelet's layout, and every update is the kubelet's atomic swap.
Podman runs exec probes as health checks only with systemd on the host; the test runs the
probe once itself (`podman healthcheck run`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.envoy.breakages import break_yaml
from tests.helpers import wait_until
from tests.runtime.podman import REPO
from tests.runtime.runtime import Runtime

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(600)]

OLD_BODY = "served by envoy-autoreload in a pod\n"
NEW_BODY = "served by envoy-autoreload in a pod, v2\n"
# A probe every 100 ms over a fresh connection, from inside the pod to its IP, until
# the new body was served 20 times in a row or the deadline; one JSON line at the end.
PROBE_SCRIPT = """\
import json, sys, time, urllib.request
url, new, deadline = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
seen, failures, new_in_a_row, requests = [], [], 0, 0
print("probing", flush=True)
while time.monotonic() < deadline and new_in_a_row < 20:
    began, body = time.monotonic(), None
    requests += 1
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            body = response.read().decode()
    except OSError as err:
        failures.append(repr(err))
    if body is not None and (not seen or seen[-1] != body):
        seen.append(body)
    new_in_a_row = new_in_a_row + 1 if body == new else 0
    time.sleep(max(0.0, 0.1 - (time.monotonic() - began)))
print(json.dumps({"seen": seen, "failures": failures, "requests": requests}))
"""


@dataclass
class Pod:
    runtime: Runtime
    name: str
    container: str
    config_volume: Path
    ip: str
    swaps: int = 0

    def get(self, url: str) -> str:
        return self.runtime.get(self.container, url)

    def events(self, name: str) -> list[dict[str, object]]:
        """The daemon's JSON log lines (--log-format=json) for event `name`."""
        found = []
        for line in self.runtime.logs(self.container).splitlines():
            if line.startswith("{") and f'"event":"{name}"' in line.replace(" ", ""):
                found.append(json.loads(line))
        return found

    def epoch(self) -> object:
        info = self.runtime.server_info(self.container, "http://127.0.0.1:9901/server_info")
        options = info["command_line_options"]
        assert isinstance(options, dict)
        return options["restart_epoch"]

    def swap(self, config: str) -> None:
        """What the kubelet does on a ConfigMap update: the new files in a new
        `..<timestamp>` directory, then `..data` renamed over (atomic), the old one gone."""
        self.swaps += 1
        old = os.readlink(self.config_volume / "..data")
        new = f"..2026_01_01_00_00_{self.swaps:02d}.000000001"
        (self.config_volume / new).mkdir()
        (self.config_volume / new / "envoy.yaml").write_text(config)
        (self.config_volume / "..data_tmp").symlink_to(new)
        os.replace(self.config_volume / "..data_tmp", self.config_volume / "..data")
        (self.config_volume / old / "envoy.yaml").unlink()
        (self.config_volume / old).rmdir()


def _podman_copy(runtime: Runtime, tmp_path: Path) -> tuple[Path, Path, str]:
    """The example's manifests with podman's adjustments (module docstring)."""
    configmap = yaml.safe_load((REPO / "examples/kubernetes/configmap.yaml").read_text())
    deployment = yaml.safe_load((REPO / "examples/kubernetes/deployment.yaml").read_text())
    configmap["metadata"]["name"] = runtime.name("config")
    deployment["metadata"]["name"] = runtime.name("k8s")
    deployment["spec"]["replicas"] = 1
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    container["image"] = runtime.image
    del container["ports"]
    (volume,) = (v for v in spec["volumes"] if v["name"] == "config")
    volume["configMap"]["name"] = runtime.name("config")
    paths = tmp_path / "configmap.yaml", tmp_path / "deployment.yaml"
    paths[0].write_text(yaml.safe_dump(configmap))
    paths[1].write_text(yaml.safe_dump(deployment))
    return paths[0], paths[1], configmap["data"]["envoy.yaml"]


def _kubelet_layout(volume: Path) -> None:
    """Podman's plain files turned into the kubelet's layout, before the pod starts."""
    first = "..2026_01_01_00_00_00.000000001"
    (volume / first).mkdir()
    os.replace(volume / "envoy.yaml", volume / first / "envoy.yaml")
    (volume / "..data").symlink_to(first)
    (volume / "envoy.yaml").symlink_to("..data/envoy.yaml")


@pytest.fixture
def pod(runtime: Runtime, tmp_path: Path) -> Iterator[Pod]:
    configmap, deployment, _ = _podman_copy(runtime, tmp_path)
    pod_name, volume = f"{runtime.name('k8s')}-pod-0", runtime.name("config")
    try:
        runtime.podman.run(
            "kube", "play", "--start=false", "--configmap", str(configmap), str(deployment)
        )
        mountpoint = Path(runtime.inspect_volume(volume))
        _kubelet_layout(mountpoint)
        runtime.podman.run("pod", "start", pod_name)
        names = runtime.podman.run(
            "ps", "--all", "--filter", f"pod={pod_name}", "--format", "{{.Names}}"
        ).stdout.split()
        (container,) = (n for n in names if not n.endswith("-infra"))
        ip = runtime.inspect(container, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")
        yield Pod(runtime, pod_name, container, mountpoint, ip)
    finally:
        runtime.podman.run("pod", "rm", "--force", "--time", "0", pod_name, check=False)
        runtime.podman.run("volume", "rm", "--force", volume, check=False)


def test_the_pod_serves_hot_restarts_on_a_configmap_swap_and_refuses_a_broken_one(
    pod: Pod, tmp_path: Path
) -> None:
    wait_until(
        lambda: pod.get(f"http://{pod.ip}:8080/") == f"200 {OLD_BODY}",
        timeout_s=60,
        what="the pod to serve on its IP",
        interval_s=0.2,
    )
    _status_on_the_pod_ip(pod)
    probe = pod.runtime.podman.popen(
        "exec", pod.container, "python3", "-c", PROBE_SCRIPT,
        f"http://{pod.ip}:8080/", NEW_BODY, "90",
    )  # fmt: skip
    try:
        assert probe.stdout is not None and probe.stdout.readline() == "probing\n"
        _, _, config = _podman_copy(pod.runtime, tmp_path)
        good = config.replace(OLD_BODY.strip(), NEW_BODY.strip())
        pod.swap(good)
        out, _ = probe.communicate(timeout=120)
    finally:
        if probe.poll() is None:
            probe.kill()
            probe.communicate()
    result = json.loads(out.splitlines()[-1])
    assert result["failures"] == [], f"{result['requests']} requests: {result['failures']}"
    assert result["seen"] == [OLD_BODY, NEW_BODY], result
    assert pod.epoch() == 1
    assert [e["epoch"] for e in pod.events("child.serving")] == [0, 1]
    _a_broken_configmap_is_refused(pod, good)


def _status_on_the_pod_ip(pod: Pod) -> None:
    """/healthz and /metrics answer on the pod IP, /status does not; the probe passes."""
    assert pod.get(f"http://{pod.ip}:9903/healthz").startswith("200 ")
    assert "envoy_autoreload_restarts_total" in pod.get(f"http://{pod.ip}:9903/metrics")
    assert pod.get(f"http://{pod.ip}:9903/status").startswith("404 ")
    assert pod.get(f"http://{pod.ip}:9902/healthz").startswith("ERROR "), "loopback only"
    assert pod.get("http://127.0.0.1:9902/status").startswith("200 "), "positive control"
    check = pod.runtime.podman.run("healthcheck", "run", pod.container, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def _a_broken_configmap_is_refused(pod: Pod, good: str) -> None:
    failed_before = len(pod.events("validation.failed"))
    pod.swap(break_yaml(good.replace(NEW_BODY.strip(), "v3")))
    wait_until(
        lambda: len(pod.events("validation.failed")) > failed_before,
        timeout_s=60,
        what="the broken ConfigMap to be refused",
        interval_s=0.2,
    )
    assert pod.get(f"http://{pod.ip}:8080/") == f"200 {NEW_BODY}"
    assert pod.epoch() == 1
    assert [e["epoch"] for e in pod.events("child.started")] == [0, 1]
    assert pod.runtime.podman.run("healthcheck", "run", pod.container).returncode == 0
