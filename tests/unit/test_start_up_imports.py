"""What the daemon imports before epoch 0 is spawned. Envoy's first start waits for the
start-up check, and the check waits for what the CLI imports before it starts it; what
the daemon imports while Envoy validates slows the validation on 2 cores (issue 16,
goal 1). The rest of the daemon is imported after the spawn.

The start path is run for real (a fake `envoy`, --status-address and a control socket
given, so their imports are on it) up to where it waits for the check's verdict.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import free_port, write_executable

FAKE_ENVOY = """\
#!/bin/sh
case "$1" in
  --version) echo "envoy  version: 0123abcd/1.40.0/Clean/RELEASE/BoringSSL" ;;
  --mode) echo "configuration '$4' OK" ;;
esac
"""

# None is needed to parse the command line, pin the config, launch `envoy --mode
# validate`, bind the status and control sockets or spawn epoch 0.
NOT_BEFORE_THE_CHECK = (
    "logging.handlers",  # with `socket` and `pickle`: the turn buffer comes at the first turn
    "socket",  # the status and control sockets are bound while Envoy validates
    "pickle",
    "envoy_autoreload.handover",  # only a re-exec reads one
    "envoy_autoreload.loop",
)
NOT_BEFORE_THE_SPAWN = (
    *NOT_BEFORE_THE_CHECK[2:],
    "yaml",  # 15 ms, for --status-address's port (addresses.py)
    "envoy_autoreload.digest",  # 20 ms, for the roots' paths (Settings.watch_paths)
    "envoy_autoreload.watch",
    "envoy_autoreload.supervisor",
    "envoy_autoreload.telemetry",
    "envoy_autoreload.status_server",
)

# Reports what is imported when the check is launched and when its verdict is awaited,
# then exits: nothing is spawned.
PROBE = """
import sys
from envoy_autoreload import head_start, validation

def imported(names):
    return " ".join(name for name in names if name in sys.modules)

def at_launch(preflight):
    print("launch:", imported({before_check!r}), flush=True)
    return commands_ahead(preflight)

def at_verdict(preflight):
    print("verdict:", imported({before_spawn!r}), flush=True)
    sys.exit(0)

commands_ahead = head_start.commands_ahead
head_start.commands_ahead = at_launch
head_start.decide_ahead = at_verdict
sys.argv[0] = "envoy-autoreload"
from envoy_autoreload.cli import main
main()
"""


def test_the_daemon_is_imported_after_epoch_0_is_spawned(tmp_path: Path) -> None:
    envoy = write_executable(tmp_path / "envoy", FAKE_ENVOY)
    script = write_executable(tmp_path / "start_envoy.sh", "#!/bin/sh\nexit 0\n")
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "envoy.yaml").write_text("static_resources: {}\n")
    probe = PROBE.format(before_check=NOT_BEFORE_THE_CHECK, before_spawn=NOT_BEFORE_THE_SPAWN)
    argv = [
        *("--envoy", str(envoy), "--watch", str(conf), "--config", str(conf / "envoy.yaml")),
        *("--state-dir", str(tmp_path / "state"), "--status-address", f"127.0.0.1:{free_port()}"),
        *("--control-socket", str(tmp_path / "run" / "control.sock"), str(script)),
    ]
    run = subprocess.run(
        [sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["launch: ", "verdict: "], run.stdout
