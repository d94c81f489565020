"""`splitd`: the daemon's entry point -- configuration, start-up, stop.

Start-up order: read config (file, then flags win; every value checked before
anything is made) -> open the data directory -> bind every listener and the
admin socket -> READY=1 to systemd. Any failure before READY is one clear line
on stderr and exit status 2 (bad configuration or arguments) or 1 (the system
refused something). A failed start removes only the sockets it bound itself.

SIGTERM/SIGINT: stop accepting, answer new requests ESHUTDOWN, let in-flight
ones finish within the grace period, flush every volume, exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import math
import os
import signal
import sqlite3
import sys
import time
import tomllib

from . import __version__
from .connections import ConnectionRegistry
from .listeners import (BindError, ListenSpecError, bind, close_all, os_reason,
                        parse_listen, unlink_owned)
from .notify import sd_notify
from .server import NBDServer
from .tls import TLSConfigError, server_context
from volumes.errors import BadInput, SplitdError
from volumes.names import format_size, parse_rate, parse_size, quoted, validate_name

log = logging.getLogger("splitd")

DEFAULT_CONFIG = "/etc/splitd/splitd.toml"
DEFAULTS = {
    "data_dir": "/var/lib/splitd",
    "listen": ["unix:/run/splitd/nbd.sock", "tcp://127.0.0.1:10809"],
    "admin_socket": "/run/splitd/admin.sock",
    "default_export": None,
    "tls": "off",
    "tls_cert": None,
    "tls_key": None,
    "tls_ca": None,
    "tls_verify_peer": False,
    "max_connections": 256,
    "max_inflight": 64,
    "reply_memory": 256 * 1024 * 1024,
    "handshake_timeout": 10.0,
    "shutdown_grace": 10.0,
    "log_level": "info",
    "ensure_volume": [],
    "copy_rate": 0,
}
# The defaults' socket directory: systemd's RuntimeDirectory makes it, and a
# daemon started by hand with the defaults makes it itself. Any other socket
# directory must exist already, or be the data directory (made at start-up).
RUNTIME_DIR = os.path.dirname(DEFAULTS["admin_socket"])
MAX_SECONDS = 86400.0

EPILOG = """\
configuration:
  Settings come from the TOML file (--config, default /etc/splitd/splitd.toml,
  ignored if absent), then from flags, which win. File keys are the long option
  names with '_' for '-', e.g.:
      data_dir = "/srv/splitd"
      listen = ["unix:/run/splitd/nbd.sock", "backup=tcp://%eth1:10809"]
      tls = "require"
      tls_cert = "/etc/splitd/server-cert.pem"
      tls_key = "/etc/splitd/server-key.pem"

  A single listen or ensure_volume entry may be a string instead of a list.
  Values are checked as strictly as the flags (booleans are true/false).

listen URIs:
  unix:/path              a Unix socket (mode 0660); its directory must exist,
                          unless it is the data directory or /run/splitd
  tcp://ADDR:PORT         TCP on an address (IPv6: tcp://[::1]:10809)
  tcp://%IFACE:PORT       TCP on every address of a network interface
  NAME=URI                the same, with a name the host agent can ask for

signals:
  SIGTERM, SIGINT   stop: finish in-flight requests, flush, exit 0

exit status:
  0   stopped by SIGTERM or SIGINT, every volume flushed; or --help, --version
  1   the system refused something at start-up: the data directory (unusable,
      or in use by another splitd), a listen address or socket path in use,
      a permission; a volume that could not be flushed at stop; or an
      unexpected failure (with a traceback)
  2   bad arguments or configuration: flags, the config file or its values,
      listen URIs (an unknown interface too), TLS files, volume specs

examples:
  splitd --data-dir ./var --listen unix:./var/nbd.sock --admin-socket ./var/admin.sock
  splitd --listen tcp://0.0.0.0:10809 --tls require --tls-cert c.pem --tls-key k.pem
"""


class ConfigError(Exception):
    pass


class StartupError(Exception):
    """Start-up refused by the system (data directory, runtime directory): exit 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line, not the usage block: the usage is one --help away.
        self.exit(2, f"splitd: error: {message} (see 'splitd --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="splitd", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Serve volumes over NBD, with split-mirror snapshots. "
                    "Managed with splitctl over the admin socket.")
    p.add_argument("--version", action="version", version=f"splitd {__version__}")
    p.add_argument("--config", metavar="FILE",
                   help=f"TOML configuration file (default {DEFAULT_CONFIG}, if it exists)")
    p.add_argument("--data-dir", metavar="DIR",
                   help=f"where volumes and metadata live (default {DEFAULTS['data_dir']})")
    p.add_argument("--listen", metavar="[NAME=]URI", action="append",
                   help="NBD listen address; repeat for several (default: "
                        + ", ".join(DEFAULTS["listen"]) + ")")
    p.add_argument("--admin-socket", metavar="PATH",
                   help=f"admin Unix socket for splitctl (default {DEFAULTS['admin_socket']})")
    p.add_argument("--default-export", metavar="NAME",
                   help="export served to clients that ask for the empty name")
    p.add_argument("--tls", choices=["off", "on", "require"],
                   help="off: no TLS; on: offer STARTTLS; require: TCP listeners refuse "
                        "plaintext (Unix sockets stay plaintext). Default off")
    p.add_argument("--tls-cert", metavar="PEM", help="server certificate (chain)")
    p.add_argument("--tls-key", metavar="PEM", help="server private key")
    p.add_argument("--tls-ca", metavar="PEM", help="CA certificate for client certificates")
    p.add_argument("--tls-verify-peer", action="store_true", default=None,
                   help="require client certificates signed by --tls-ca")
    p.add_argument("--max-connections", type=int, metavar="N",
                   help=f"NBD connection cap (default {DEFAULTS['max_connections']})")
    p.add_argument("--max-inflight", type=int, metavar="N",
                   help=f"requests in flight per connection (default {DEFAULTS['max_inflight']})")
    p.add_argument("--reply-memory", metavar="BYTES",
                   help="replies queued for all clients together before a client that has "
                        "not read its replies for 10 s is disconnected (K/M/G suffixes; "
                        "default 256M)")
    p.add_argument("--handshake-timeout", type=float, metavar="S",
                   help=f"seconds a client has to finish the handshake "
                        f"(default {DEFAULTS['handshake_timeout']:g})")
    p.add_argument("--shutdown-grace", type=float, metavar="S",
                   help=f"seconds in-flight requests get at stop (default {DEFAULTS['shutdown_grace']:g})")
    p.add_argument("--copy-rate", metavar="BYTES_PER_S",
                   help="cap on the copy engine's total rate, all pairs together "
                        "(K/M/G suffixes; 0 = unlimited, the default)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="default info")
    p.add_argument("--ensure-volume", metavar="NAME:SIZE", action="append",
                   help="create this volume at start if it does not exist (e.g. demo:1G)")
    return p


# -- checking settings: the same rules for the file and for flags ------------------------------

class _Bad(ValueError):
    """A value refused: says what would be accepted; the caller adds which setting."""


def _got(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return quoted(value)


def _string(value) -> str:
    if not isinstance(value, str):
        raise _Bad(f"must be a string (got {_got(value)})")
    if not value:
        raise _Bad("must not be empty")
    if "\0" in value:
        raise _Bad(f"must not contain a NUL character (got {_got(value)})")
    return value


def _choice(*choices: str):
    def check(value) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _Bad(f"must be one of {', '.join(choices)} (got {_got(value)})")
        return value
    return check


def _boolean(value) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"must be true or false (got {_got(value)})")
    return value


def _at_least(minimum: int):
    def check(value) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"must be a whole number (got {_got(value)})")
        if value < minimum:
            raise _Bad(f"must be at least {minimum} (got {value})")
        return value
    return check


def _seconds(zero_allowed: bool):
    def check(value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise _Bad(f"must be a number of seconds (got {_got(value)})")
        if zero_allowed and value < 0:
            raise _Bad(f"must be 0 or more (got {value:g})")
        if not zero_allowed and value <= 0:
            raise _Bad(f"must be greater than 0 (got {value:g})")
        if value > MAX_SECONDS:
            raise _Bad(f"must be at most {MAX_SECONDS:g} (a day) (got {value:g})")
        return float(value)
    return check


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Bad(f"must be a string or a list of strings (got {_got(value)})")
    return list(value)


def _listen(value) -> list[str]:
    specs = _strings(value)
    if not specs:
        raise _Bad("must list at least one listen URI")
    for spec in specs:
        parse_listen(spec)
    return specs


def _ensure_volumes(value) -> list[tuple[str, int]]:
    """NAME[:SIZE] specs (SIZE default 1G), all checked: nothing is created yet."""
    volumes: dict[str, int] = {}
    for spec in _strings(value):
        name, _, size = spec.partition(":")
        try:
            validate_name(name)
            size_bytes = parse_size(size or "1G", f"size of volume {name}")
        except BadInput as e:
            raise _Bad(f"{quoted(spec)}: {e}") from None
        if name in volumes:
            raise _Bad(f"{quoted(spec)}: volume {name} is listed twice")
        volumes[name] = size_bytes
    return list(volumes.items())


def _export_name(value) -> str:
    return validate_name(_string(value))


def _copy_rate(value) -> int:
    return parse_rate(value, "copy rate")


def _reply_memory(value) -> int:
    n = parse_rate(value, "reply memory")
    if n < 64 * 1024 * 1024:
        raise _Bad(f"must be at least 64M, two of the largest replies (got {_got(value)})")
    return n


SETTINGS = {
    "data_dir": _string,
    "listen": _listen,
    "admin_socket": _string,
    "default_export": _export_name,
    "tls": _choice("off", "on", "require"),
    "tls_cert": _string,
    "tls_key": _string,
    "tls_ca": _string,
    "tls_verify_peer": _boolean,
    "max_connections": _at_least(1),
    "max_inflight": _at_least(1),
    "reply_memory": _reply_memory,
    "handshake_timeout": _seconds(zero_allowed=False),
    "shutdown_grace": _seconds(zero_allowed=True),
    "log_level": _choice("debug", "info", "warning", "error"),
    "ensure_volume": _ensure_volumes,
    "copy_rate": _copy_rate,
}
assert set(SETTINGS) == set(DEFAULTS)


def _checked(key: str, value, where: str):
    # The checkers raise _Bad, or the refusals of the parsers they call.
    try:
        return SETTINGS[key](value)
    except (_Bad, BadInput, ListenSpecError) as e:
        raise ConfigError(f"{where}: {e}") from None


def load_config(args: argparse.Namespace) -> dict:
    """Defaults, then the file, then flags; every value given is checked, and
    normalised: listen a list of URIs, ensure_volume a list of (name, bytes),
    seconds floats, copy_rate bytes/s."""
    cfg = dict(DEFAULTS)
    where = {key: f"default {key}" for key in DEFAULTS}
    path = args.config or DEFAULT_CONFIG
    if args.config or os.path.exists(path):
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except OSError as e:
            raise ConfigError(f"config file {path}: {os_reason(e)}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        unknown = set(data) - set(DEFAULTS)
        if unknown:
            raise ConfigError(f"config file {path}: unknown keys: {', '.join(sorted(unknown))}")
        for key, value in data.items():
            where[key] = f"{path}: {key}"
            cfg[key] = _checked(key, value, where[key])
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            where[key] = "--" + key.replace("_", "-")
            cfg[key] = _checked(key, value, where[key])

    if cfg["tls"] != "off" and not (cfg["tls_cert"] and cfg["tls_key"]):
        if where["tls"] == "--tls":
            raise ConfigError(f"--tls {cfg['tls']} needs --tls-cert and --tls-key")
        raise ConfigError(f"{where['tls']}: {cfg['tls']!r} needs tls_cert and tls_key "
                          "(or --tls-cert and --tls-key)")
    data_dir = os.path.abspath(cfg["data_dir"])
    for spec in cfg["listen"]:
        listener = parse_listen(spec)
        if listener.kind == "unix":
            _check_socket_dir(listener.path, data_dir, f"{where['listen']}: {spec}")
    _check_socket_dir(os.path.abspath(cfg["admin_socket"]), data_dir,
                      f"{where['admin_socket']}: {cfg['admin_socket']}")
    return cfg


def _check_socket_dir(path: str, data_dir: str, what: str) -> None:
    """A socket's directory must exist: splitd makes only its data directory
    and the default runtime directory, never a mistyped path."""
    directory = os.path.dirname(path)
    if directory in (data_dir, RUNTIME_DIR) or os.path.isdir(directory):
        return
    state = "is not a directory" if os.path.lexists(directory) else "does not exist"
    raise ConfigError(f"{what}: directory {directory} {state}")


def _not_a_directory(path: str) -> str:
    """The first component of `path`, from the root, that exists and is not a directory."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        p = os.sep.join(parts[:i])
        if os.path.lexists(p) and not os.path.isdir(p):
            return p
    return path


def _data_dir_error(e: Exception, data_dir: str) -> StartupError:
    if isinstance(e, OSError) and e.errno in (errno.EEXIST, errno.ENOTDIR) and e.filename:
        reason = f"{_not_a_directory(e.filename)} is not a directory"
    elif isinstance(e, OSError) and e.errno:
        reason = os_reason(e)
        if e.filename and os.path.abspath(e.filename) != os.path.abspath(data_dir):
            reason += f" ({e.filename})"
    else:  # sqlite3.Error: the metadata database
        reason = f"metadata database: {e}"
    return StartupError(f"data directory {data_dir}: {reason}")


def setup_logging(level: str) -> None:
    # One line per event on stderr; journald adds the time and unit.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if sys.stderr.isatty() or not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


class Daemon:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.started = time.time()
        self.listeners = [parse_listen(s) for s in cfg["listen"]]
        self.stop_event: asyncio.Event | None = None

    def _make_runtime_dir(self) -> None:
        """Make RUNTIME_DIR if a socket goes there (started by hand with the
        defaults; under systemd, RuntimeDirectory= has made it already)."""
        paths = [l.path for l in self.listeners if l.kind == "unix"]
        paths.append(os.path.abspath(self.cfg["admin_socket"]))
        if any(os.path.dirname(p) == RUNTIME_DIR for p in paths):
            try:
                os.makedirs(RUNTIME_DIR, 0o750, exist_ok=True)
            except OSError as e:
                raise StartupError(f"cannot make the runtime directory {RUNTIME_DIR}: "
                                   f"{os_reason(e)}") from None

    def info(self) -> dict:
        return {"version": __version__, "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started, 3),
                "data_dir": os.path.abspath(self.cfg["data_dir"]),
                "listeners": [l.as_dict() for l in self.listeners]}

    async def run(self) -> int:
        from controller.pairs import PairManager
        from controller.service import Controller
        from daemon.exports import VolumeExports
        from daemon.admin_server import start_admin_server
        from volumes.manager import VolumeManager

        cfg = self.cfg
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        tls_context = None
        if cfg["tls"] != "off":
            tls_context = server_context(cfg["tls_cert"], cfg["tls_key"], cfg["tls_ca"],
                                         bool(cfg["tls_verify_peer"]))
        for l in self.listeners:
            l.tls_required = cfg["tls"] == "require" and l.kind == "tcp"

        try:
            manager = VolumeManager(cfg["data_dir"])
        except (OSError, sqlite3.Error) as e:
            raise _data_dir_error(e, cfg["data_dir"]) from None
        pairs = None
        admin = admin_owned = None
        try:
            # Every spec was checked with the configuration: none fails half-way here.
            for name, size in cfg["ensure_volume"]:
                vol = manager.find(name)
                if vol is None:
                    manager.create(name, size)
                elif vol.size != size:
                    # Only created, never resized (that is `splitctl volume resize`).
                    log.warning("ensure-volume %s:%s: volume %s exists with %s; left as it is",
                                name, format_size(size), name, format_size(vol.size))
            registry = ConnectionRegistry()
            pairs = PairManager(manager, registry, int(cfg["copy_rate"]))
            exports = VolumeExports(manager, pairs, cfg["default_export"])
            server = NBDServer(exports, registry, tls_context=tls_context,
                               max_connections=int(cfg["max_connections"]),
                               max_inflight=int(cfg["max_inflight"]),
                               reply_memory=int(cfg["reply_memory"]),
                               handshake_timeout=float(cfg["handshake_timeout"]))
            controller = Controller(manager, registry, self.info, pairs)
            self._make_runtime_dir()
            for l in self.listeners:
                await bind(l, server.protocol_factory(l))
                log.info("listening on %s (%s)%s", l.name, ", ".join(l.bound),
                         " TLS required" if l.tls_required else "")
            admin, admin_owned = await start_admin_server(cfg["admin_socket"], controller)
        except BaseException:
            # Only what this process bound goes: never a socket of a daemon
            # already serving the path that made this start fail.
            await close_all(self.listeners)
            if admin is not None:
                admin.close()
            if admin_owned is not None:
                unlink_owned(admin_owned)
            if pairs is not None:
                pairs.close()
            manager.close()
            raise
        pairs.start()
        log.info("admin socket %s; %d volumes; ready", cfg["admin_socket"], len(manager.list()))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        # Everything made at start-up lives as long as the daemon: keep it out
        # of the collector's way, so a full collection (a pause of
        # milliseconds, say in the middle of a split) walks only what is new.
        gc.freeze()
        sd_notify(f"READY=1\nSTATUS=serving {len(manager.list())} volumes\nMAINPID={os.getpid()}")

        await self.stop_event.wait()

        log.info("stopping: finishing in-flight requests")
        sd_notify("STOPPING=1")
        await close_all(self.listeners)
        await server.shutdown(float(cfg["shutdown_grace"]))
        await pairs.stop()
        admin.close()
        unlink_owned(admin_owned)
        unflushed = []
        for vol in manager.list():
            try:
                await loop.run_in_executor(None, vol.flush)
            except OSError as e:
                log.error("flush of %s failed at stop: %s", vol.name, e)
                unflushed.append(vol.name)
        pairs.close()
        manager.close()
        if unflushed:
            # Acknowledged writes may not be durable: say so to systemd too.
            log.error("stopped, but these volumes could not be flushed: %s",
                      ", ".join(unflushed))
            return 1
        log.info("stopped")
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args)
        setup_logging(cfg["log_level"])
        daemon = Daemon(cfg)
    except (ConfigError, ListenSpecError) as e:
        return _error(2, str(e))
    try:
        import uvloop
        return uvloop.run(daemon.run()) if hasattr(uvloop, "run") else _run_with_policy(daemon)
    except (ListenSpecError, TLSConfigError, BadInput) as e:
        return _error(2, str(e))
    except (SplitdError, StartupError, BindError) as e:
        return _error(1, str(e))
    except OSError as e:
        if e.errno and e.filename:
            return _error(1, f"{e.filename}: {os_reason(e)}")
        return _error(1, os_reason(e) if e.errno else str(e))
    except KeyboardInterrupt:
        return 0


def _error(status: int, message: str) -> int:
    print(f"splitd: error: {' '.join(message.split())}", file=sys.stderr)
    return status


def _run_with_policy(daemon: Daemon) -> int:
    import uvloop
    uvloop.install()
    return asyncio.run(daemon.run())


if __name__ == "__main__":
    sys.exit(main())
