"""The `envoy-autoreload` command: parse flags, build Settings, run, map errors to exit codes.

A thin shell over `supervisor.run()`. Every option also reads an `ENVOY_AUTORELOAD_*`
environment variable, so a unit file or a container spec can configure it without
editing the command line. This is the only place an `AutoreloadError` becomes a
message and an exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import click

from envoy_autoreload import HANDOVER_FD_VARIABLE, __version__
from envoy_autoreload.errors import AutoreloadError, ExitCode, StartScriptError
from envoy_autoreload.logs import LogFormat, configure_logging, flush_logs, log_event
from envoy_autoreload.settings import (
    DEFAULT_ENVOY,
    Settings,
    check_config,
    check_envoy,
    check_start_script,
    default_state_dir,
)

# The rest of the daemon is imported once epoch 0 is spawned (`head_start.py`): about
# 0.1 s that Envoy used to wait for (issue 16).
if TYPE_CHECKING:
    from envoy_autoreload.addresses import AdminAddress
    from envoy_autoreload.control import ControlServer
    from envoy_autoreload.handover import Handover
    from envoy_autoreload.head_start import HeadStart
    from envoy_autoreload.watch import WatcherKind
    from envoy_autoreload.watch.changes import ChangeDetector

ENV_PREFIX = "ENVOY_AUTORELOAD_"
logger = logging.getLogger(__name__)


def _env(name: str) -> str:
    return ENV_PREFIX + name


def _start_script(ctx: click.Context, param: click.Parameter, value: Path) -> Path:
    try:
        return check_start_script(value)
    except StartScriptError as err:
        if ctx.params.get("check_only") and not ctx.params.get("self_test"):
            return value.absolute()  # --check reports it as a FAIL line, exit 1
        raise click.BadParameter(str(err), ctx=ctx, param=param) from err


def _health_urls(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    if not value:
        return value
    from envoy_autoreload.health import parse_health_url

    try:
        return tuple(parse_health_url(url) for url in value)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from err


def _admin_address(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> AdminAddress | None:
    if value is None:
        return None
    from envoy_autoreload.addresses import parse_admin_address

    try:
        return parse_admin_address(value)
    except AutoreloadError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from err


SECONDS = click.FloatRange(min=0.0)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument(
    "start_script",
    type=click.Path(path_type=Path),
    callback=_start_script,
    envvar=_env("START_SCRIPT"),
)
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path),
    envvar=_env("CONFIG"),
    show_envvar=True,
    help="Envoy bootstrap config; its admin.address is how we see LIVE.",
)
@click.option(
    "--admin-address",
    callback=_admin_address,
    envvar=_env("ADMIN_ADDRESS"),
    show_envvar=True,
    help="HOST:PORT of Envoy's admin (default: from the config).",
)
@click.option(
    "--base-id",
    type=click.IntRange(min=0),
    envvar=_env("BASE_ID"),
    show_envvar=True,
    help="Envoy --base-id, for its shared memory (default: from Envoy's command line).",
)
@click.option(
    "--term-wait",
    "term_wait_s",
    type=SECONDS,
    default=30.0,
    envvar=_env("TERM_WAIT"),
    show_envvar=True,
    help="Seconds children get after SIGTERM before SIGKILL.",
)
@click.option(
    "--start-timeout",
    "start_timeout_s",
    type=click.FloatRange(min=0.1),
    default=60.0,
    envvar=_env("START_TIMEOUT"),
    show_envvar=True,
    help="Seconds a new epoch gets to become LIVE before it is killed.",
)
@click.option(
    "--max-drain-wait",
    "max_drain_wait_s",
    type=SECONDS,
    default=60.0,
    envvar=_env("MAX_DRAIN_WAIT"),
    show_envvar=True,
    help="Longest a restart waits for the previous parent to exit (0: do not wait).",
)
@click.option(
    "--exit-on-child-failure",
    is_flag=True,
    envvar=_env("EXIT_ON_CHILD_FAILURE"),
    show_envvar=True,
    help="Upstream's behaviour: any failed child stops everything, exit 1.",
)
@click.option(
    "--watch",
    "watch",
    multiple=True,
    type=click.Path(path_type=Path),
    envvar=_env("WATCH"),
    show_envvar=True,
    help="File or directory (recursive) whose changes hot restart Envoy; repeatable.",
)
@click.option(
    "--envoy",
    "envoy",
    default=DEFAULT_ENVOY,
    envvar=_env("ENVOY"),
    show_envvar=True,
    help="The Envoy binary the start script runs (watched with --watch).",
)
@click.option(
    "--no-watch-binary",
    is_flag=True,
    envvar=_env("NO_WATCH_BINARY"),
    show_envvar=True,
    help="Do not restart when the Envoy binary changes.",
)
@click.option(
    "--no-watch-referenced",
    is_flag=True,
    envvar=_env("NO_WATCH_REFERENCED"),
    show_envvar=True,
    help="Do not watch the files the config names (certificates, keys, Lua, bodies).",
)
@click.option(
    "--watcher",
    type=click.Choice(["auto", "inotify", "watchdog"]),
    default="auto",
    envvar=_env("WATCHER"),
    show_envvar=True,
    help="inotify on Linux, watchdog elsewhere (auto).",
)
@click.option(
    "--ignore",
    "ignore",
    multiple=True,
    envvar=_env("IGNORE"),
    show_envvar=True,
    help="File-name glob to ignore besides editor temp files; repeatable.",
)
@click.option(
    "--debounce",
    "debounce_s",
    type=SECONDS,
    default=0.3,
    envvar=_env("DEBOUNCE"),
    show_envvar=True,
    help="Quiet seconds after the last change before restarting.",
)
@click.option(
    "--debounce-max",
    "debounce_max_s",
    type=SECONDS,
    default=5.0,
    envvar=_env("DEBOUNCE_MAX"),
    show_envvar=True,
    help="Longest wait after the first change of a burst.",
)
@click.option(
    "--watch-degraded",
    is_flag=True,
    envvar=_env("WATCH_DEGRADED"),
    show_envvar=True,
    help="Start even when inotify limits allow watching only part of the paths.",
)
@click.option(
    "--no-validate",
    is_flag=True,
    envvar=_env("NO_VALIDATE"),
    show_envvar=True,
    help="Do not run `envoy --mode validate` before a restart.",
)
@click.option(
    "--validate-timeout",
    "validate_timeout_s",
    type=click.FloatRange(min=0.1),
    default=30.0,
    envvar=_env("VALIDATE_TIMEOUT"),
    show_envvar=True,
    help="Seconds validation (and each binary check) may take.",
)
@click.option(
    "--on-incompatible-binary",
    type=click.Choice(["refuse", "restart"]),
    default="refuse",
    envvar=_env("ON_INCOMPATIBLE_BINARY"),
    show_envvar=True,
    help="A new binary that cannot hot restart: keep the old (refuse), or stop and start.",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    envvar=_env("STATE_DIR"),
    show_envvar=True,
    help="Where config generations (snapshots and history) are kept "
    "[default: $STATE_DIRECTORY or /var/lib/envoy-autoreload].",
)
@click.option(
    "--keep-generations",
    type=click.IntRange(min=2),
    default=10,
    envvar=_env("KEEP_GENERATIONS"),
    show_envvar=True,
    help="How many config generations history keeps.",
)
@click.option(
    "--health-window",
    "health_window_s",
    type=click.FloatRange(min=0.0),
    default=10.0,
    envvar=_env("HEALTH_WINDOW"),
    show_envvar=True,
    help="Seconds a new generation is on probation after LIVE (0: none).",
)
@click.option(
    "--health-url",
    "health_urls",
    multiple=True,
    envvar=_env("HEALTH_URL"),
    show_envvar=True,
    callback=_health_urls,
    help="http:// URL that must answer 2xx during probation (repeatable).",
)
@click.option(
    "--no-rollback",
    is_flag=True,
    envvar=_env("NO_ROLLBACK"),
    show_envvar=True,
    help="A generation that fails probation keeps serving; it is only reported.",
)
@click.option(
    "--status-address",
    envvar=_env("STATUS_ADDRESS"),
    show_envvar=True,
    help="HOST:PORT for GET /status, /metrics, /healthz (off by default; loopback only).",
)
@click.option(
    "--status-allow-remote",
    is_flag=True,
    envvar=_env("STATUS_ALLOW_REMOTE"),
    show_envvar=True,
    help="Allow a non-loopback --status-address.",
)
@click.option(
    "--control-socket",
    type=click.Path(path_type=Path),
    envvar=_env("CONTROL_SOCKET"),
    show_envvar=True,
    help="Unix socket for envoy-autoreloadctl "
    "[default: $RUNTIME_DIRECTORY/control.sock or /run/envoy-autoreload/control.sock].",
)
@click.option(
    "--no-control-socket",
    is_flag=True,
    envvar=_env("NO_CONTROL_SOCKET"),
    show_envvar=True,
    help="Do not open the control socket.",
)
@click.option(
    "--check",
    "check_only",
    is_flag=True,
    is_eager=True,  # known before START_SCRIPT is checked
    help="Print what would be watched, the binary, validation and inotify limits; start "
    "nothing. Exit 0 if all is well, 1 if something would fail.",
)
@click.option(
    "--self-test",
    is_flag=True,
    is_eager=True,
    hidden=True,  # run by the daemon itself before it re-executes in place
    help="Parse and check everything as a start would, start nothing, print "
    "'self-test ok: envoy-autoreload VERSION' and exit 0.",
)
@click.option(
    "--log-format",
    type=click.Choice(["human", "json"]),
    default="human",
    envvar=_env("LOG_FORMAT"),
    show_envvar=True,
    help="Log line format.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    envvar=_env("LOG_LEVEL"),
    show_envvar=True,
)
@click.version_option(__version__, prog_name="envoy-autoreload")
def cli(**options: Any) -> None:
    """Run START_SCRIPT as Envoy's hot-restart supervisor (drop-in for hot-restarter.py).

    START_SCRIPT is exec'd with RESTART_EPOCH=0, 1, 2, ... and must end in
    `exec envoy ... --restart-epoch "$RESTART_EPOCH"`. SIGHUP hot restarts,
    SIGUSR1 is forwarded (log reopen), SIGTERM/SIGINT stop every child.
    """
    _run(CliOptions(**options))


@dataclass(frozen=True, slots=True)
class CliOptions:
    """What the command line and the ENVOY_AUTORELOAD_* variables said, as click parsed
    them (callbacks applied): one typed value to hand on instead of 35 arguments."""

    start_script: Path
    script_args: tuple[str, ...]
    config: Path | None
    admin_address: AdminAddress | None
    base_id: int | None
    term_wait_s: float
    start_timeout_s: float
    max_drain_wait_s: float
    exit_on_child_failure: bool
    watch: tuple[Path, ...]
    envoy: str
    no_watch_binary: bool
    no_watch_referenced: bool
    watcher: WatcherKind
    ignore: tuple[str, ...]
    debounce_s: float
    debounce_max_s: float
    watch_degraded: bool
    no_validate: bool
    validate_timeout_s: float
    on_incompatible_binary: Literal["refuse", "restart"]
    state_dir: Path | None
    keep_generations: int
    health_window_s: float
    health_urls: tuple[str, ...]
    no_rollback: bool
    status_address: str | None
    status_allow_remote: bool
    control_socket: Path | None
    no_control_socket: bool
    check_only: bool
    self_test: bool
    log_format: LogFormat
    log_level: str


def _run(opts: CliOptions) -> None:
    """Check, report (`--check`, `--self-test`) or start; exits with the daemon's code."""
    configure_logging(opts.log_format, opts.log_level)
    check_only = opts.check_only and not opts.self_test  # the self-test checks as a start does
    settings = _settings(opts, check_only)
    _check_state_dir_unwatched(settings)
    if check_only:
        from envoy_autoreload.check import run_check  # 0.05 s of imports a start never needs

        sys.exit(run_check(settings, _change_detector(settings), click.echo))
    address = _status_address(opts.status_address, opts.status_allow_remote)
    if opts.self_test:
        _change_detector(settings)
        _import_the_daemon()
        click.echo(f"self-test ok: envoy-autoreload {__version__}")
        sys.exit(0)
    control = _OpenControl(opts.no_control_socket, opts.control_socket)
    # A binary that is not Envoy, or a config that does not validate, is refused by the
    # start-up check (`Gatekeeper.check_before_first_start`) before `daemon.started`.
    handover = _inherited_handover(control, address)
    started = functools.partial(
        log_event,
        logger,
        logging.INFO,
        "daemon.started",
        "a re-executed image: adopting the running family" if handover else "",
        version=__version__,
        pid=os.getpid(),
        start_script=str(opts.start_script),
    )  # once the start-up checks passed: a refusal is one line, not a start and a stop
    if handover is not None:  # a re-exec adopts the family: there is no check to start
        listening = _listen(control, address, handover.inherited)
        sys.exit(int(_serve(settings, address, listening, handover, started)))
    from envoy_autoreload.head_start import head_start

    with head_start(settings) as head:
        listening = _listen(control, address, {})  # in use: refused before Envoy runs
        head.spawn_epoch_0(settings)
        sys.exit(int(_serve(settings, address, listening, handover, started, head)))


def _settings(opts: CliOptions, check_only: bool) -> Settings:
    """The daemon's settings; a binary or config the user got wrong is click's one-line
    usage error (exit 2)."""
    envoy, config = _checked_binary_and_config(
        opts.envoy, opts.config, opts.no_validate, check_only
    )
    return Settings(
        start_script=opts.start_script,
        script_args=opts.script_args,
        term_wait_s=opts.term_wait_s,
        start_timeout_s=opts.start_timeout_s,
        max_drain_wait_s=opts.max_drain_wait_s,
        config=config,
        admin_address=opts.admin_address,
        base_id=opts.base_id,
        exit_on_child_failure=opts.exit_on_child_failure,
        watch=tuple(p.absolute() for p in opts.watch),
        envoy=envoy,
        watch_binary=not opts.no_watch_binary,
        watch_referenced=not opts.no_watch_referenced,
        watcher=opts.watcher,
        ignore=opts.ignore,
        debounce_s=opts.debounce_s,
        debounce_max_s=opts.debounce_max_s,
        watch_degraded=opts.watch_degraded,
        validate=not opts.no_validate,
        validate_timeout_s=opts.validate_timeout_s,
        on_incompatible_binary=opts.on_incompatible_binary,
        log_format=opts.log_format,
        state_dir=(opts.state_dir or default_state_dir()).absolute(),
        keep_generations=opts.keep_generations,
        health_window_s=opts.health_window_s,
        health_urls=opts.health_urls,
        rollback=not opts.no_rollback,
    )


def _import_the_daemon() -> None:
    """What a start imports only once Envoy validates: a new image about to be
    re-executed into (`--self-test`) must prove that all of it imports."""
    import envoy_autoreload.control
    import envoy_autoreload.head_start
    import envoy_autoreload.proc_adoption
    import envoy_autoreload.status_server
    import envoy_autoreload.supervisor
    import envoy_autoreload.telemetry  # noqa: F401


def _exit_with(err: AutoreloadError) -> NoReturn:
    """A start-up refusal: the one line the operator reads, after what was logged."""
    flush_logs()
    click.echo(f"envoy-autoreload: error: {err}", err=True)
    sys.exit(int(err.exit_code))


def _inherited_handover(control: _OpenControl, status: tuple[str, int] | None) -> Handover | None:
    """What the previous image handed over, if this is a re-exec (reexec.py)."""
    if HANDOVER_FD_VARIABLE not in os.environ:
        return None  # a plain start: handover.py is not even imported
    from envoy_autoreload.handover import HandoverError, read_inherited

    try:
        return read_inherited(os.environ)
    except HandoverError as err:
        from envoy_autoreload.proc_adoption import LOST, Listeners, handover_from_proc

        control_path = control.socket_path()
        listeners = Listeners(control_path.absolute() if control_path else None, status)
        rebuilt = handover_from_proc(os.getpid(), time.monotonic(), listeners)
        log_event(
            logger,
            logging.ERROR,
            "daemon.adoption_failed",
            f"{err}; "
            + (
                f"adopting the Envoys /proc shows instead (lost: {LOST})"
                if rebuilt is not None
                else "no Envoy of ours runs: starting as a new daemon"
            ),
        )
        return rebuilt


def _checked_binary_and_config(
    envoy: str, config: Path | None, no_validate: bool, check_only: bool
) -> tuple[Path | None, Path | None]:
    """The Envoy binary and the config as the daemon will use them; a user's mistake
    is click's one-line usage error (exit 2)."""
    ctx = click.get_current_context()
    envoy_explicit = ctx.get_parameter_source("envoy") != click.core.ParameterSource.DEFAULT
    try:
        envoy_path = check_envoy(envoy, explicit=envoy_explicit and not check_only)
    except AutoreloadError as err:
        raise click.BadParameter(str(err), param_hint="--envoy") from err
    if config is not None and check_only:
        return envoy_path, config.absolute()  # a missing one is a FAIL line of the report
    if config is not None:
        try:
            config = check_config(config)
        except AutoreloadError as err:
            raise click.BadParameter(str(err), param_hint="--config") from err
        if envoy_path is None and not no_validate:
            raise click.BadParameter(
                f"no Envoy binary {envoy!r} to validate {config} with "
                "(give --envoy PATH, or --no-validate)",
                param_hint="--envoy",
            )
    return envoy_path, config


def _status_address(value: str | None, allow_remote: bool) -> tuple[str, int] | None:
    """--status-address checked (not bound: that is `_serve`'s)."""
    if value is None:
        return None
    try:
        from envoy_autoreload.addresses import parse_status_address

        return parse_status_address(value, allow_remote=allow_remote)
    except AutoreloadError as err:
        raise click.BadParameter(str(err), param_hint="--status-address") from err


def _check_state_dir_unwatched(settings: Settings) -> None:
    """Every history write inside a watched tree would be a file change: a restart loop."""
    state_dir = settings.state_dir
    if state_dir is None or settings.config is None:
        return
    for root in settings.watch:
        if state_dir.is_relative_to(root.absolute()):
            raise click.BadParameter(
                f"{state_dir} is inside --watch {root}: each generation written there "
                "would be a change to restart for; put it outside the watched paths",
                param_hint="--state-dir",
            )


def _change_detector(settings: Settings) -> ChangeDetector | None:
    roots = settings.watch_roots()
    if not roots:
        return None
    from envoy_autoreload.watch.changes import ChangeDetector

    return ChangeDetector(
        roots,
        watcher_kind=settings.watcher,
        ignore_globs=settings.ignore,
        quiet_s=settings.debounce_s,
        max_wait_s=settings.debounce_max_s,
    )


@dataclass(frozen=True, slots=True)
class _OpenControl:
    disabled: bool
    path: Path | None

    def socket_path(self) -> Path | None:
        """The one given, else the default one; None without a control socket."""
        if self.disabled:
            return None
        from envoy_autoreload.control import default_control_socket

        return self.path or default_control_socket()


@dataclass(frozen=True, slots=True)
class _Listening:
    """The daemon's own sockets, bound before epoch 0 is spawned (or handed over)."""

    control: ControlServer | None
    status_fd: int | None  # bound and listening, for the status server


def _listen(
    control_wanted: _OpenControl, address: tuple[str, int] | None, inherited: Mapping[str, int]
) -> _Listening:
    """The status address and the control socket (the previous image's, after a
    re-exec): one taken is one line, before any Envoy starts."""
    try:
        status_fd = inherited.get("status")
        if address is not None and status_fd is None:
            from envoy_autoreload.status_address import listen_status

            status_fd = listen_status(address).detach()
        control = None
        if not control_wanted.disabled:
            control = _open_control(control_wanted.path, inherited.get("control"))
    except AutoreloadError as err:
        _exit_with(err)
    return _Listening(control, status_fd)


def _serve(
    settings: Settings,
    address: tuple[str, int] | None,
    listening: _Listening,
    handover: Handover | None,
    started: Callable[[], None],
    head: HeadStart | None = None,
) -> ExitCode:
    """Run the supervisor with its status server and control socket around it."""
    from envoy_autoreload import heap
    from envoy_autoreload.supervisor import run
    from envoy_autoreload.telemetry import Telemetry

    with contextlib.ExitStack() as stack:
        control = listening.control
        if control is not None:
            stack.callback(control.close)
        try:
            heap.enable()
            changes = _change_detector(settings)
            telemetry = Telemetry()
            server = None
            if address is not None:
                from envoy_autoreload.status_server import StatusServer

                server = StatusServer(address, telemetry, listening.status_fd)
                server.start()
                stack.callback(server.close)
            return run(
                settings,
                changes,
                telemetry=telemetry,
                control=control,
                status_fd=server.fileno() if server is not None else None,
                handover=handover,
                started=started,
                lineage=head.lineage if head is not None else None,
                processes=head.spawner if head is not None else None,
                early=head.early if head is not None else None,
            )
        except AutoreloadError as err:
            _exit_with(err)


def _open_control(path: Path | None, inherited_fd: int | None) -> ControlServer | None:
    """The given socket must open; the default one is a convenience: without it (no
    /run access for a non-root drop-in, or a second daemon) we run on and say so."""
    from envoy_autoreload.control import ControlServer, default_control_socket

    if inherited_fd is not None:
        return ControlServer.inherited((path or default_control_socket()).absolute(), inherited_fd)
    if path is not None:
        return ControlServer(path.absolute())
    default = default_control_socket()
    try:
        return ControlServer(default)
    except AutoreloadError as err:
        log_event(
            logger,
            logging.WARNING,
            "control.unavailable",
            f"{err}; envoy-autoreloadctl cannot reach this daemon (give --control-socket)",
        )
        return None


def main() -> None:
    cli.main(prog_name="envoy-autoreload")


__all__ = ["ExitCode", "cli", "main"]
