"""splitd-host serve: the host agent as a service (DESIGN.md "Backup", steps 1-2).

It answers the daemon's admin protocol (remoteapi: newline-delimited JSON; on
TCP only over TLS and only after a bearer token, so splitctl's
RemoteAdminClient talks to it unchanged) on two listeners:

    --socket PATH            a Unix socket, mode 0660: full local rights
    --listen tcp://ADDR:PORT TLS (--tls-cert, --tls-key) and a token
                             (splitd-host token create; agents/host/tokens.py)

Methods (the scope a token needs):
    ping                          read     {"pong": true}
    list                          read     {"attachments": [...]}, as `splitd-host list --json`
    status                        read     version, pid, uptime, watchdog, what was thawed at
                                           start, expedite (RCU, see rcu.py), prepares done /
                                           failed / running
    prepare {directory, port,     prepare  agents/host/prepare.py's answer; refusals carry
             resync?}                      its codes (not-splitd, busy, split-failed, ...);
                                           resync (bool, default false): a pair left split
                                           is resynced first instead of refused

prepare blocks (the hook, the freeze, the daemon's split): it runs in a worker
thread while the event loop goes on serving; a connection's next request
waits for its answer. At most MAX_PREPARES run at once, and one per filesystem
(prepare's lock: "busy").

Start-up, in order: the configuration (TOML, then flags), HostState.open
(thaws what a previous agent left frozen, from the watchdog's journal, and
starts the watchdog process), the listeners, then READY=1 to systemd.
SIGTERM/SIGINT: STOPPING=1, the listeners close, running prepares finish
(each is bounded by the watchdog timeout and the hook timeout), the watchdog
stops, exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import signal
import ssl
import sys
import time
import tomllib
from dataclasses import dataclass, fields, replace
from typing import Any

from agents.host.attach import Attachments, status as attachment_status
from agents.host.prepare import PrepareError, prepare
from agents.host.state import DEFAULT_HOOK_TIMEOUT, HookConfig, HostState
from agents.host.tokens import HostScope, HostTokens, TokenDB, authorize, required_scope
from common.errors import BadInput, Conflict, Forbidden, SplitdError, Unauthorized, UnknownMethod
from daemon.listeners import BindError
from daemon.notify import sd_notify
from daemon.tls import TLSConfigError, server_context
from remoteapi.lines import Request, answer, error, parse_request
from remoteapi.server import LOCAL, TokenConnection, TokenServer
from splitctl.client import DEFAULT_AGENT_PORT

log = logging.getLogger("splitd-host")

DEFAULT_CONFIG = "/etc/splitd-host/splitd-host.toml"
DEFAULT_SOCKET = "/run/splitd-host/agent.sock"
MAX_PREPARES = 4
MAX_PATH = 4096

NEEDS_TOKEN = ("unauthorized: this agent port needs a token first: the first request must be "
               '{"method": "auth", "params": {"token": SECRET}} (splitctl backup prepare '
               "--token-file FILE)")
BAD_TOKEN = ("unauthorized: the token is not valid (unknown, revoked or mistyped); make one "
             "with 'splitd-host token create' on the application host")


@dataclass(frozen=True)
class ServeConfig:
    """Every setting of `splitd-host serve`; the defaults are these."""

    listen: str | None = None               # tcp://ADDR:PORT, TLS + tokens
    socket: str = DEFAULT_SOCKET
    tls_cert: str | None = None
    tls_key: str | None = None
    watchdog_timeout: float = 10.0
    hook: str | None = None
    hook_timeout: float = DEFAULT_HOOK_TIMEOUT
    handshake_timeout: float = 10.0
    log_level: str = "info"
    expedite: bool = True                   # RCU grace periods during FIFREEZE (rcu.py)


KEYS = tuple(f.name for f in fields(ServeConfig))
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A setting that cannot be used: one line, naming where it came from."""


def _seconds(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
        raise ConfigError(f"{where}: give seconds, more than 0 and at most 3600 (got {value!r})")
    return float(value)


def _check(key: str, value: object, where: str) -> object:
    if key.endswith("_timeout"):
        return _seconds(value, where)
    if key == "expedite":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: give true or false (got {value!r})")
        return value
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: give a non-empty string (got {value!r})")
    if key == "log_level" and value not in LOG_LEVELS:
        raise ConfigError(f"{where}: one of {', '.join(LOG_LEVELS)} (got {value!r})")
    if key == "listen":
        from splitctl.client import parse_connect

        try:
            parse_connect(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return value


def load_config(args: argparse.Namespace) -> ServeConfig:
    """The file (--config; the default one only if it exists), then the flags."""
    path = args.config or DEFAULT_CONFIG
    settings: dict[str, Any] = {}
    if args.config or os.path.exists(path):
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read the configuration {path}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
        for key, value in data.items():
            if key not in KEYS:
                raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(KEYS)})")
            settings[key] = _check(key, value, f"{path}: {key}")
    for key in KEYS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = _check(key, value, "--" + key.replace("_", "-"))
    cfg = replace(ServeConfig(), **settings)
    if cfg.listen and not (cfg.tls_cert and cfg.tls_key):
        raise ConfigError("--listen needs --tls-cert and --tls-key: the agent's TCP port "
                          "speaks only TLS")
    if not cfg.listen and (cfg.tls_cert or cfg.tls_key):
        raise ConfigError("--tls-cert and --tls-key go with --listen")
    return cfg


class Service:
    """The agent's requests, on both listeners: the Gate of each TokenServer."""

    label = "splitd-host"
    log = log
    needs_token = NEEDS_TOKEN
    bad_token = BAD_TOKEN

    def __init__(self, cfg: ServeConfig, state: HostState, tokens: HostTokens):
        self.cfg = cfg
        self.state = state
        self.tokens = tokens
        self.started = time.time()
        self.pool = concurrent.futures.ThreadPoolExecutor(MAX_PREPARES, "prepare")
        self.running: dict[int, dict[str, Any]] = {}     # id -> what is being prepared
        self.done = 0
        self.failed = 0
        self.last: dict[str, Any] | None = None
        self.listeners: list[str] = []
        self.stopping = False
        self._ids = 0

    # -- the Gate ---------------------------------------------------------------------------

    def verify(self, secret: object) -> Any:
        return self.tokens.verify(secret)

    def used(self, token: Any) -> None:
        self.tokens.used(token)

    def still_valid(self, token: Any) -> bool:
        return self.tokens.still_valid(token)

    def welcome(self, token: Any) -> dict[str, Any]:
        return {"token": token.name, "scope": token.scope, "dirs": token.dirs}

    def handle(self, conn: TokenConnection, line: bytes) -> bytes | asyncio.Future[bytes]:
        request = parse_request(line)
        if isinstance(request, bytes):
            return request
        try:
            self._authorize(conn, request)
            if request.method == "prepare":
                return self._start_prepare(request)
        except SplitdError as e:
            return error(request.id, e.code, str(e))
        return answer(request, lambda: self.call(request.method, request.params or {}), log)

    def _authorize(self, conn: TokenConnection, request: Request) -> None:
        token = conn.token
        if request.method == "auth":
            raise Conflict("this connection is authenticated already" if token is not LOCAL
                           else "the local socket needs no token")
        if token is LOCAL:
            return
        if not self.tokens.still_valid(token):
            log.info("%s: token %s was revoked; closing", conn.peer, token.name)
            raise Unauthorized(f"unauthorized: token {token.name!r} was revoked")
        try:
            authorize(token, request.method, request.params or {})
        except Forbidden as e:
            log.warning("%s (token %s): %s refused: %s", conn.peer, token.name, request.method, e)
            raise
        if required_scope(request.method) is not HostScope.READ:
            # Who asked for what, from where: the audit trail of remote prepares.
            shown = {k: str(v)[:200] for k, v in list((request.params or {}).items())[:4]}
            log.info("%s (token %s): %s %s", conn.peer, token.name, request.method, shown)

    # -- methods ----------------------------------------------------------------------------

    def call(self, method: str, params: dict[str, Any]) -> Any:
        if method == "ping":
            return {"pong": True}
        if method == "list":
            return {"attachments": [attachment_status(a)
                                    for a in Attachments(self.state.state_dir).list()]}
        if method == "status":
            return self.status()
        raise UnknownMethod(f"unknown method {method!r}: splitd-host answers prepare, list, "
                            "status and ping")

    def status(self) -> dict[str, Any]:
        watchdog = self.state.watchdog
        return {
            "version": _version(), "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
            "state_dir": str(self.state.state_dir), "listeners": self.listeners,
            "watchdog": {"alive": bool(watchdog is not None and watchdog.alive),
                         "pid": watchdog.pid if watchdog is not None else None,
                         "timeout_s": self.cfg.watchdog_timeout},
            "thawed_at_start": self.state.thawed_at_start,
            "expedite": self.state.expedite,
            "prepares": {"done": self.done, "failed": self.failed,
                         "running": list(self.running.values()), "last": self.last},
        }

    def _start_prepare(self, request: Request) -> asyncio.Future[bytes]:
        params = request.params or {}
        directory, port = params.get("directory"), params.get("port")
        if not isinstance(directory, str) or not directory or len(directory) > MAX_PATH:
            raise BadInput("prepare needs \"directory\": the path of a directory on an attached "
                           "splitd volume")
        if not isinstance(port, str) or not port:
            raise BadInput("prepare needs \"port\": the daemon's port to reach the secondary by")
        resync = params.get("resync", False)
        if not isinstance(resync, bool):
            raise BadInput("prepare's \"resync\" is true or false")
        if self.stopping:
            raise Conflict("splitd-host is stopping: no new prepare")
        if len(self.running) >= MAX_PREPARES:
            raise Conflict(f"busy: {MAX_PREPARES} prepares are running already ("
                           + ", ".join(r["directory"] for r in self.running.values()) + ")")
        self._ids += 1
        ident = self._ids
        self.running[ident] = {"directory": directory, "port": port, "started": time.time()}
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.pool, self._prepare, request, directory, port,
                                      resync)
        future.add_done_callback(lambda f: self.running.pop(ident, None))
        return future

    def _prepare(self, request: Request, directory: str, port: str, resync: bool) -> bytes:
        """In a worker thread: the reply to one prepare."""
        outcome: dict[str, Any] = {}

        def run() -> dict:
            try:
                result = prepare(self.state, directory, port, timeout=self.cfg.watchdog_timeout,
                                 resync=resync)
            except PrepareError as e:
                outcome.update(error=e.code)
                raise
            outcome.update(result)
            return result

        reply = answer(request, run, log, _prepare_error)
        summary = {"directory": directory, "port": port, "at": time.time(),
                   "error": outcome.get("error", "internal" if not outcome else None)}
        if "error" not in outcome and outcome:
            self.done += 1
            summary.update({k: outcome.get(k) for k in ("pair", "split_gen", "window_ms",
                                                         "prepare_ms")})
            log.info("prepared %s: pair %s generation %s, frozen %s ms, prepare %s ms",
                     directory, outcome.get("pair"), outcome.get("split_gen"),
                     outcome.get("window_ms"), outcome.get("prepare_ms"))
        else:
            self.failed += 1
        self.last = summary
        return reply


def _prepare_error(e: Exception, method: str) -> tuple[str, str] | None:
    if isinstance(e, PrepareError):
        return e.code, e.message
    return None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("splitd")
    except PackageNotFoundError:
        return "unknown"


# -- the process ----------------------------------------------------------------------------

async def serve(cfg: ServeConfig, state_dir: str) -> int:
    tls_context: ssl.SSLContext | None = None
    if cfg.listen:
        assert cfg.tls_cert is not None and cfg.tls_key is not None
        tls_context = server_context(cfg.tls_cert, cfg.tls_key)
    tokens = HostTokens(TokenDB(state_dir))
    hook = HookConfig(cfg.hook, cfg.hook_timeout) if cfg.hook else HookConfig()
    loop = asyncio.get_running_loop()
    # Thaws what a previous agent left frozen, starts the watchdog process.
    state = await loop.run_in_executor(None, lambda: HostState.open(
        state_dir, hook=hook, freeze_timeout=cfg.watchdog_timeout, expedite=cfg.expedite))
    for t in state.thawed_at_start:
        log.warning("%s was left frozen by agent pid %s (watchdog pid %s): %s", t["mountpoint"],
                    t.get("agent_pid"), t.get("watchdog_pid"), t["result"])
    if state.rcu_restored:
        log.warning("%s", state.rcu_restored)
    service = Service(cfg, state, tokens)
    servers: list[TokenServer] = []
    try:
        if cfg.socket == DEFAULT_SOCKET:
            # systemd's RuntimeDirectory= makes it; by hand, we do.
            os.makedirs(os.path.dirname(DEFAULT_SOCKET), mode=0o755, exist_ok=True)
        local = TokenServer(f"unix:{cfg.socket}", service, None, cfg.handshake_timeout)
        await local.start()
        servers.append(local)
        if cfg.listen:
            remote = TokenServer(cfg.listen, service, tls_context, cfg.handshake_timeout)
            await remote.start()
            servers.append(remote)
    except BaseException:
        for server in servers:
            await server.stop()
        state.close()
        raise
    service.listeners = [b for s in servers for b in s.listener.bound]
    log.info("serving on %s; watchdog pid %s; %d tokens", ", ".join(service.listeners),
             state.watchdog.pid if state.watchdog else None, len(tokens.list()))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sd_notify(f"READY=1\nSTATUS=serving on {', '.join(service.listeners)}\nMAINPID={os.getpid()}")
    await stop.wait()

    log.info("stopping")
    sd_notify("STOPPING=1")
    service.stopping = True
    for server in servers:
        await server.stop_listening()
    if service.running:
        log.info("waiting for %d prepares to finish", len(service.running))
    # Each prepare is bounded: the hook timeout, then the watchdog's. Their
    # answers go out as they finish; then every connection is closed.
    await loop.run_in_executor(None, service.pool.shutdown)
    for server in servers:
        server.drop_connections(abort=False)
    await loop.run_in_executor(None, state.close)
    tokens.db.close()
    log.info("stopped")
    return 0


def _run(args: argparse.Namespace) -> int:
    from agents.host.cli import EXIT_USAGE, PROG

    try:
        cfg = load_config(args)
    except ConfigError as e:
        print(f"{PROG} serve: {e}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(name)s: %(levelname)s: %(message)s")
    try:
        return asyncio.run(serve(cfg, args.state_dir))
    except (BindError, TLSConfigError, FileExistsError) as e:
        print(f"{PROG} serve: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG} serve: {e.strerror or e}{': ' + e.filename if e.filename else ''}",
              file=sys.stderr)
        return 1


EPILOG = f"""\
configuration:
  Settings come from the TOML file (--config, default {DEFAULT_CONFIG},
  ignored if absent), then from flags, which win. File keys are the long
  option names with '_' for '-' (the state directory is --state-dir, or
  $SPLITD_HOST_STATE_DIR, as for every splitd-host command):
      listen = "tcp://192.0.2.10:{DEFAULT_AGENT_PORT}"
      tls_cert = "/etc/splitd-host/cert.pem"
      tls_key = "/etc/splitd-host/key.pem"
      watchdog_timeout = 10
      hook = "/etc/splitd-host/freeze-hook"
      expedite = true       # false: as --no-expedite

methods (newline-delimited JSON, as splitd's admin API):
  ping, list, status             scope read
  prepare {{directory, port}}      scope prepare (a token's --dirs glob limits it)
  Over TCP the first line must be {{"id":1,"method":"auth","params":{{"token":SECRET}}}};
  the Unix socket (mode 0660) has full local rights and needs none.

signals:
  SIGTERM, SIGINT  stop: close the listeners, let running prepares finish,
                   stop the watchdog (which thaws anything still frozen)

examples:
  splitd-host serve --listen tcp://0.0.0.0:{DEFAULT_AGENT_PORT} --tls-cert cert.pem --tls-key key.pem
  splitd-host serve --socket /tmp/agent.sock --state-dir /tmp/agent
  splitctl backup prepare --host app1 --dir /srv/db --port backup \\
      --token-file backup.token --tls-ca ca.pem
"""


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    # Here, not at the top: cli imports this module to register it.
    from agents.host.cli import EXPEDITE_HELP, _positive as seconds

    p = commands.add_parser(
        "serve", parents=[common], help="run the agent's service (prepare over TCP/TLS)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the host agent as a service: answer prepare, list, status and\n"
                    "ping on a local Unix socket (full rights) and, with --listen, on a\n"
                    "TCP port with TLS and bearer tokens (splitd-host token create). At\n"
                    "start it thaws any filesystem a previous agent left frozen (status\n"
                    "reports them), starts the watchdog, then tells systemd it is ready.",
        epilog=EPILOG)
    p.add_argument("--config", metavar="FILE", help=f"TOML configuration (default {DEFAULT_CONFIG})")
    p.add_argument("--listen", metavar="tcp://ADDR:PORT",
                   help=f"TCP port for remote clients, TLS only (e.g. tcp://0.0.0.0:{DEFAULT_AGENT_PORT}; "
                        "default: none)")
    p.add_argument("--socket", metavar="PATH", help=f"local Unix socket (default {DEFAULT_SOCKET})")
    p.add_argument("--tls-cert", metavar="PEM", help="the agent's certificate (with --listen)")
    p.add_argument("--tls-key", metavar="PEM", help="its private key")
    p.add_argument("--watchdog-timeout", type=seconds, metavar="S",
                   help="longest freeze: the watchdog thaws after S seconds (default 10)")
    p.add_argument("--hook", metavar="PATH",
                   help="run `PATH freeze MOUNTPOINT` before each freeze and `PATH thaw "
                        "MOUNTPOINT` after each thaw (as qemu-ga's fsfreeze-hook)")
    p.add_argument("--hook-timeout", type=seconds, metavar="S",
                   help=f"kill the hook after S seconds and refuse the prepare (default "
                        f"{DEFAULT_HOOK_TIMEOUT:g})")
    p.add_argument("--handshake-timeout", type=seconds, metavar="S",
                   help="a TCP client must finish TLS and send its token within S seconds "
                        "(default 10)")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="default info")
    p.add_argument("--no-expedite", dest="expedite", action="store_const", const=False,
                   default=None, help=EXPEDITE_HELP)
    p.set_defaults(run=_run)
