"""What a runtime test holds: podman, the project's image, and names nothing else uses.

Every pod, container and volume a test makes is named `ear-test-<pid>-<what>` and removed
when the test ends, failed or not (`running`); a run killed before that is cleaned up by
the next one (podman._remove_stale).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from tests.runtime.podman import NAME_PREFIX, Podman

# An HTTP GET from inside a container, over a fresh connection: the image has python3 but
# no curl. Prints "STATUS BODY" or "ERROR why"; exits 0 either way.
GET_SCRIPT = """\
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
        print(r.status, r.read().decode(errors="replace"), end="")
except urllib.error.HTTPError as err:
    print(err.code, err.read().decode(errors="replace"), end="")
except OSError as err:
    print("ERROR", err, end="")
"""


@dataclass(frozen=True, slots=True)
class Runtime:
    podman: Podman
    image: str

    def name(self, what: str) -> str:
        return f"{NAME_PREFIX}{os.getpid()}-{what}"

    @contextlib.contextmanager
    def running(self, what: str, *run_args: str) -> Iterator[str]:
        """`podman run -d --name NAME RUN_ARGS`, removed (with its volumes) on the way out."""
        name = self.name(what)
        try:
            self.podman.run("run", "-d", "--name", name, *run_args)
            yield name
        finally:
            self.podman.remove_everything_named(name)

    def logs(self, container: str) -> str:
        result = self.podman.run("logs", container, check=False)
        return result.stdout + result.stderr

    def get(self, container: str, url: str) -> str:
        """GET `url` from inside `container`'s network namespace: "STATUS BODY"."""
        result = self.podman.exec(container, "python3", "-c", GET_SCRIPT, url, check=False)
        if result.returncode != 0:
            state = self.inspect(container, "{{json .State}}")
            raise AssertionError(
                f"GET {url} in {container} exited {result.returncode}: {result.stdout}"
                f"{result.stderr}\nstate: {state}\nlogs:\n{self.logs(container)[-6000:]}"
            )
        return result.stdout

    def inspect(self, container: str, template: str) -> str:
        return self.podman.run("inspect", "--format", template, container).stdout.strip()

    def inspect_volume(self, volume: str) -> str:
        """Where volume `volume` is on the host."""
        return self.podman.run(
            "volume", "inspect", "--format", "{{.Mountpoint}}", volume
        ).stdout.strip()

    def exit_code(self, container: str, timeout_s: float = 60) -> int:
        """Wait for `container` to exit; its exit code."""
        try:
            result = self.podman.run("wait", container, timeout_s=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise AssertionError(f"{container} still running after {timeout_s} s") from err
        return int(result.stdout.strip())

    def server_info(self, container: str, url: str) -> dict[str, object]:
        status, _, body = self.get(container, url).partition(" ")
        assert status == "200", f"{url}: {status} {body}"
        info: dict[str, object] = json.loads(body)
        return info
