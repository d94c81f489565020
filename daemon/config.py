"""splitd's configuration: the flags, the TOML file, and the Config they make.

Rule of this module: load_config() is the only way to a Config, and a Config
holds only checked values. The file (--config, default DEFAULT_CONFIG, ignored
if absent) overrides the defaults and flags override the file; every value,
wherever it came from, passes the same checker (SETTINGS), and a refusal is a
ConfigError naming where the value came from (a flag, or the file and key).
Nothing is created or bound here: start-up (daemon/main.py) does that.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, NoReturn

from common.errors import BadInput
from common.names import parse_rate, parse_size, quoted, validate_name

from . import __version__
from .listeners import ListenSpecError, os_reason, parse_listen, parse_listeners

DEFAULT_CONFIG = "/etc/splitd/splitd.toml"


@dataclass(frozen=True)
class Config:
    """Every setting of the daemon, checked and normalised: sizes and rates in
    bytes, seconds as floats, lists as tuples. The defaults are these."""

    data_dir: str = "/var/lib/splitd"
    listen: tuple[str, ...] = ("unix:/run/splitd/nbd.sock", "tcp://127.0.0.1:10809")
    admin_socket: str = "/run/splitd/admin.sock"
    default_export: str | None = None
    tls: str = "off"                    # off, on (offer STARTTLS) or require
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_verify_peer: bool = False
    max_connections: int = 256
    max_inflight: int = 64
    reply_memory: int = 256 * 1024 * 1024
    handshake_timeout: float = 10.0
    shutdown_grace: float = 10.0
    log_level: str = "info"
    ensure_volume: tuple[tuple[str, int], ...] = ()     # (name, size in bytes)
    copy_rate: int = 0                  # bytes/s for all pairs together; 0 = unlimited
    admin_listen: str | None = None     # tcp://ADDR:PORT: the remote admin API (TLS + tokens)


DEFAULTS = Config()
# A setting's file key; its flag is the same with "--" and "-" for "_".
KEYS = tuple(f.name for f in fields(Config))
# The defaults' socket directory: systemd's RuntimeDirectory makes it, and a
# daemon started by hand with the defaults makes it itself. Any other socket
# directory must exist already, or be the data directory (made at start-up).
RUNTIME_DIR = os.path.dirname(DEFAULTS.admin_socket)
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

  A single listen or ensure_volume entry may be a string instead of a list;
  listen may also be a table of port names, in order (last in the file: in
  TOML, the keys after a table header belong to that table):
      [listen]
      local = "unix:/run/splitd/nbd.sock"
      backup = "tcp://%eth1:10809"
  Values are checked as strictly as the flags (booleans are true/false).

listen URIs:
  unix:/path              a Unix socket (mode 0660); its directory must exist,
                          unless it is the data directory or /run/splitd
  tcp://ADDR:PORT         TCP on an address (IPv6: tcp://[::1]:10809)
  tcp://%IFACE:PORT       TCP on every address of a network interface
  tcp://...?tls=MODE      that TCP port's own TLS mode (off, on, require),
                          instead of --tls: e.g. plaintext on the application
                          network, TLS required on the backup network
  NAME=URI                the same, named: the name is a *port*, which
                          'splitctl port list' shows and 'splitctl locate
                          PAIR --port NAME' gives a secondary's NBD URI
                          through. Names follow the volume name rules and
                          are unique. A listener without one is named after
                          its kind, counting the unnamed ones: unix, unix-2,
                          ... and tcp, tcp-2, ...

remote admin API (--admin-listen tcp://ADDR:PORT, or tcp://%IFACE:PORT):
  The admin API on TCP, only with TLS (--tls-cert and --tls-key are needed,
  whatever --tls says) and only with a bearer token made with
  'splitctl token create' on the admin socket. Clients:
  splitctl --connect tcp://HOST:PORT --token-file FILE --tls-ca CA.

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



class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
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
                   help=f"where volumes and metadata live (default {DEFAULTS.data_dir})")
    p.add_argument("--listen", metavar="[NAME=]URI", action="append",
                   help="NBD listen address, named NAME (a port; default: unix, tcp, "
                        "tcp-2, ... by kind); repeat for several (default: "
                        + ", ".join(DEFAULTS.listen) + ")")
    p.add_argument("--admin-socket", metavar="PATH",
                   help=f"admin Unix socket for splitctl (default {DEFAULTS.admin_socket})")
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
                   help=f"NBD connection cap (default {DEFAULTS.max_connections})")
    p.add_argument("--max-inflight", type=int, metavar="N",
                   help=f"requests in flight per connection (default {DEFAULTS.max_inflight})")
    p.add_argument("--reply-memory", metavar="BYTES",
                   help="replies queued for all clients together before a client that has "
                        "not read its replies for 10 s is disconnected (K/M/G suffixes; "
                        "default 256M)")
    p.add_argument("--handshake-timeout", type=float, metavar="S",
                   help=f"seconds a client has to finish the handshake "
                        f"(default {DEFAULTS.handshake_timeout:g})")
    p.add_argument("--shutdown-grace", type=float, metavar="S",
                   help=f"seconds in-flight requests get at stop (default {DEFAULTS.shutdown_grace:g})")
    p.add_argument("--copy-rate", metavar="BYTES_PER_S",
                   help="cap on the copy engine's total rate, all pairs together "
                        "(K/M/G suffixes; 0 = unlimited, the default)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="default info")
    p.add_argument("--admin-listen", metavar="tcp://ADDR:PORT",
                   help="also serve the admin API on TCP, with TLS and tokens only "
                        "(needs --tls-cert and --tls-key)")
    p.add_argument("--ensure-volume", metavar="NAME:SIZE", action="append",
                   help="create this volume at start if it does not exist (e.g. demo:1G)")
    return p


# -- checking settings: the same rules for the file and for flags ------------------------------

class _Bad(ValueError):
    """A value refused: says what would be accepted; the caller adds which setting."""


def _got(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return quoted(value)


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _Bad(f"must be a string (got {_got(value)})")
    if not value:
        raise _Bad("must not be empty")
    if "\0" in value:
        raise _Bad(f"must not contain a NUL character (got {_got(value)})")
    return value


def _choice(*choices: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _Bad(f"must be one of {', '.join(choices)} (got {_got(value)})")
        return value
    return check


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"must be true or false (got {_got(value)})")
    return value


def _at_least(minimum: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"must be a whole number (got {_got(value)})")
        if value < minimum:
            raise _Bad(f"must be at least {minimum} (got {value})")
        return value
    return check


def _seconds(zero_allowed: bool) -> Callable[[object], float]:
    def check(value: object) -> float:
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


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Bad(f"must be a string or a list of strings (got {_got(value)})")
    return list(value)


def _listen(value: object) -> tuple[str, ...]:
    """[NAME=]URI specs; in the file also a table of NAME = URI. Names are
    checked (and the unnamed ones named) as the daemon will name them."""
    if isinstance(value, dict):
        if not all(isinstance(v, str) for v in value.values()):
            raise _Bad(f"a table of listeners maps port names to URI strings (got {_got(value)})")
        specs = [f"{name}={uri}" for name, uri in value.items()]
    else:
        specs = _strings(value)
    if not specs:
        raise _Bad("must list at least one listen URI")
    parse_listeners(specs)
    return tuple(specs)


def _ensure_volumes(value: object) -> tuple[tuple[str, int], ...]:
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
    return tuple(volumes.items())


def _export_name(value: object) -> str:
    return validate_name(_string(value))


def _copy_rate(value: object) -> int:
    return parse_rate(value, "copy rate")


def _reply_memory(value: object) -> int:
    n = parse_rate(value, "reply memory")
    if n < 64 * 1024 * 1024:
        raise _Bad(f"must be at least 64M, two of the largest replies (got {_got(value)})")
    return n


def _admin_listen(value: object) -> str:
    uri = _string(value)
    listener = parse_listen(uri)
    if listener.kind != "tcp" or "=" in uri.split("://", 1)[0]:
        raise _Bad(f"must be tcp://ADDR:PORT or tcp://%IFACE:PORT (got {_got(value)})")
    if not re.search(r":\d+/?$", uri):
        raise _Bad(f"needs a port: tcp://ADDR:PORT (got {_got(value)})")
    return uri


SETTINGS: dict[str, Callable[[object], object]] = {
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
    "admin_listen": _admin_listen,
}
assert tuple(SETTINGS) == KEYS


def _checked(key: str, value: object, where: str) -> object:
    # The checkers raise _Bad, or the refusals of the parsers they call.
    try:
        return SETTINGS[key](value)
    except (_Bad, BadInput, ListenSpecError) as e:
        raise ConfigError(f"{where}: {e}") from None


def load_config(args: argparse.Namespace) -> Config:
    """The defaults, then the file, then flags: every value given is checked
    and normalised (see Config), and nothing is made or opened but the file."""
    # Each value is what its field's checker returned: of that field's type.
    given: dict[str, Any] = {}
    where = {key: f"default {key}" for key in KEYS}
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
        unknown = set(data) - set(KEYS)
        if unknown:
            raise ConfigError(f"config file {path}: unknown keys: {', '.join(sorted(unknown))}")
        for key, value in data.items():
            where[key] = f"{path}: {key}"
            given[key] = _checked(key, value, where[key])
    for key in KEYS:
        value = getattr(args, key, None)
        if value is not None:
            where[key] = "--" + key.replace("_", "-")
            given[key] = _checked(key, value, where[key])
    cfg = replace(DEFAULTS, **given)

    if cfg.tls != "off" and not (cfg.tls_cert and cfg.tls_key):
        if where["tls"] == "--tls":
            raise ConfigError(f"--tls {cfg.tls} needs --tls-cert and --tls-key")
        raise ConfigError(f"{where['tls']}: {cfg.tls!r} needs tls_cert and tls_key "
                          "(or --tls-cert and --tls-key)")
    if cfg.admin_listen and not (cfg.tls_cert and cfg.tls_key):
        raise ConfigError(f"{where['admin_listen']}: the remote admin API is served only with "
                          "TLS: give tls_cert and tls_key (or --tls-cert and --tls-key)")
    data_dir = os.path.abspath(cfg.data_dir)
    for spec, listener in zip(cfg.listen, parse_listeners(cfg.listen), strict=True):
        if listener.tls_mode not in (None, "off") and not (cfg.tls_cert and cfg.tls_key):
            raise ConfigError(f"{where['listen']}: {spec}: TLS needs tls_cert and tls_key "
                              "(or --tls-cert and --tls-key)")
        if listener.kind == "unix":
            _check_socket_dir(listener.path, data_dir, f"{where['listen']}: {spec}")
    _check_socket_dir(os.path.abspath(cfg.admin_socket), data_dir,
                      f"{where['admin_socket']}: {cfg.admin_socket}")
    return cfg


def _check_socket_dir(path: str, data_dir: str, what: str) -> None:
    """A socket's directory must exist: splitd makes only its data directory
    and the default runtime directory, never a mistyped path."""
    directory = os.path.dirname(path)
    if directory in (data_dir, RUNTIME_DIR) or os.path.isdir(directory):
        return
    state = "is not a directory" if os.path.lexists(directory) else "does not exist"
    raise ConfigError(f"{what}: directory {directory} {state}")
