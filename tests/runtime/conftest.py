"""The runtime tests' session: podman set up (or found in the cache) once, the project's
image built once, and removed at the end.

Set-up runs inside the first runtime test, so those tests carry `timeout(RUNTIME_TIMEOUT_S)`
(from scratch: apt-get, mmdebstrap, the build, about a minute on two cores) instead of the
suite's 180 s; every wait inside them has its own, shorter deadline.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.runtime.podman import prepare, unavailable_reason
from tests.runtime.runtime import Runtime


@pytest.fixture(scope="session")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") == "true" and os.geteuid() == 0:
            pytest.fail(f"runtime tests cannot run as root in CI: {reason}")
        pytest.skip(f"RUNTIME TESTS (podman, systemd, kube play) NOT RUN: {reason}")
    podman, image = prepare(tmp_path_factory.mktemp("context"), str(os.getpid()))
    try:
        yield Runtime(podman, image)
    finally:
        podman.run("rmi", "--force", image, check=False)
