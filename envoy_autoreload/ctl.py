"""`envoy-autoreloadctl reload|status|history|rollback|reexec`: the daemon's synchronous client
(as supervisorctl is to supervisord). `reload` (and `rollback`) return when it is over:
exit 0 with the serving epoch on stdout when the new config serves (or the content was
already serving), exit 1 with the reason on stderr when it was refused or failed.
`systemctl reload` runs it (ExecReload=), so a failed reload is a failed `systemctl
reload`.

Before it sends anything or believes an answer, it checks who listens (SO_PEERCRED): only
a daemon running as our own uid or as root is trusted, so a socket someone else put at
the path cannot answer `{"ok": true}` to a reload.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Final

import click

from envoy_autoreload import __version__
from envoy_autoreload.control import default_control_socket

EXIT_FAILED: Final = 1
EXIT_UNREACHABLE: Final = 3


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a connected unix socket; None where
    the platform has no SO_PEERCRED (not Linux)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _connect(sock: socket.socket, path: Path) -> None:
    """Connect, then refuse a peer that is neither us nor root: one line, exit 3."""
    try:
        sock.connect(str(path))
        uid = peer_uid(sock)
    except OSError as err:
        click.echo(
            f"envoy-autoreloadctl: cannot reach the daemon at {path}: {err.strerror or err}",
            err=True,
        )
        sys.exit(EXIT_UNREACHABLE)
    if uid is not None and uid not in (os.geteuid(), 0):
        click.echo(
            f"envoy-autoreloadctl: {path} is served by uid {uid}, neither us nor root: "
            "not trusting its answer",
            err=True,
        )
        sys.exit(EXIT_UNREACHABLE)


def _ask(path: Path, request: str, timeout_s: float) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        _connect(sock, path)
        chunks = []
        try:
            sock.sendall(request.encode() + b"\n")
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            click.echo(f"envoy-autoreloadctl: no answer within {timeout_s:g} s", err=True)
            sys.exit(EXIT_FAILED)
        except OSError as err:
            click.echo(
                f"envoy-autoreloadctl: the daemon went away: {err.strerror or err}", err=True
            )
            sys.exit(EXIT_FAILED)
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        click.echo("envoy-autoreloadctl: the daemon closed without an answer", err=True)
        sys.exit(EXIT_FAILED)
    return reply


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--control-socket",
    type=click.Path(path_type=Path),
    default=default_control_socket,
    envvar="ENVOY_AUTORELOAD_CONTROL_SOCKET",
    show_envvar=True,
    show_default="$RUNTIME_DIRECTORY/control.sock or /run/envoy-autoreload/control.sock",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=300.0,
    show_default=True,
    help="Seconds to wait for the answer.",
)
@click.version_option(__version__, prog_name="envoy-autoreloadctl")
@click.pass_context
def ctl(ctx: click.Context, control_socket: Path, timeout_s: float) -> None:
    """Talk to a running envoy-autoreload."""
    ctx.obj = (control_socket, timeout_s)


@ctl.command()
@click.option("--force", is_flag=True, help="Restart even when the content is unchanged.")
@click.pass_obj
def reload(obj: tuple[Path, float], force: bool) -> None:
    """Validate and hot restart; exit 0 only once the new config serves."""
    path, timeout_s = obj
    reply = _ask(path, "reload --force" if force else "reload", timeout_s)
    if reply.get("ok"):
        click.echo(f"epoch {reply.get('epoch')}: {reply.get('message')}")
        return
    click.echo(f"envoy-autoreloadctl: reload failed: {reply.get('message')}", err=True)
    sys.exit(EXIT_FAILED)


@ctl.command()
@click.option("--json", "as_json", is_flag=True, help="The raw status object.")
@click.pass_obj
def status(obj: tuple[Path, float], as_json: bool) -> None:
    """What the daemon serves and what happened last (as GET /status)."""
    path, timeout_s = obj
    reply = _ask(path, "status", timeout_s)
    state = reply.get("status")
    if not isinstance(state, dict):
        click.echo(f"envoy-autoreloadctl: {reply.get('message')}", err=True)
        sys.exit(EXIT_FAILED)
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    for key, value in state.items():
        shown = json.dumps(value) if isinstance(value, dict | list) else value
        click.echo(f"{key + ':':<24}{'-' if value is None else shown}")


@ctl.command()
@click.option("--json", "as_json", is_flag=True, help="The raw list.")
@click.pass_obj
def history(obj: tuple[Path, float], as_json: bool) -> None:
    """Config generations, newest first: hash, when, epoch, outcome."""
    path, timeout_s = obj
    reply = _ask(path, "history", timeout_s)
    body = reply.get("status")
    entries = body.get("generations") if isinstance(body, dict) else None
    if not isinstance(entries, list):
        click.echo(f"envoy-autoreloadctl: {reply.get('message')}", err=True)
        sys.exit(EXIT_FAILED)
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        click.echo("no generations (generations are off, or nothing was validated yet)")
    for entry in entries:
        click.echo(_history_line(entry))


def _history_line(entry: object) -> str:
    if not isinstance(entry, dict):
        return str(entry)
    stamp = entry.get("updated_at")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
        if isinstance(stamp, int | float)
        else "-"
    )
    epoch = entry.get("epoch")
    detail = entry.get("detail")
    return (
        f"{entry.get('short')}  {when}  epoch {'-' if epoch is None else epoch:<4} "
        f"{entry.get('outcome'):<10}{'' if not detail else '  ' + str(detail)}"
    )


@ctl.command()
@click.argument("hash_prefix", required=False)
@click.pass_obj
def rollback(obj: tuple[Path, float], hash_prefix: str | None) -> None:
    """Go back to the last good config (or HASH_PREFIX); exit 0 only once it serves."""
    path, timeout_s = obj
    request = f"rollback {hash_prefix}" if hash_prefix else "rollback"
    reply = _ask(path, request, timeout_s)
    if reply.get("ok"):
        click.echo(f"epoch {reply.get('epoch')}: {reply.get('message')}")
        return
    click.echo(f"envoy-autoreloadctl: rollback failed: {reply.get('message')}", err=True)
    sys.exit(EXIT_FAILED)


@ctl.command()
@click.pass_obj
def reexec(obj: tuple[Path, float]) -> None:
    """Re-execute the daemon in place (an upgraded package takes effect); Envoy keeps
    serving. Exit 0 once the new image has taken over, 1 when it was refused."""
    path, timeout_s = obj
    reply = _ask(path, "reexec", timeout_s)
    if reply.get("ok"):
        click.echo(str(reply.get("message")))
        return
    click.echo(f"envoy-autoreloadctl: {reply.get('message')}", err=True)
    sys.exit(EXIT_FAILED)


def main() -> None:
    ctl.main(prog_name="envoy-autoreloadctl")
