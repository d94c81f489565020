"""`splitd`: the daemon's entry point -- wires the pieces together, starts, stops.

Start-up order: read config (daemon/config.py: file, then flags win; every
value checked before anything is made) -> open the data directory -> bind every listener and the
admin socket -> READY=1 to systemd. Any failure before READY is one clear line
on stderr and exit status 2 (bad configuration or arguments) or 1 (the system
refused something). A failed start removes only the sockets it bound itself.

SIGTERM/SIGINT: stop accepting, answer new requests ESHUTDOWN, let in-flight
ones finish within the grace period, flush every volume, exit 0.
"""
from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import signal
import sqlite3
import sys
import time

from common.errors import BadInput, SplitdError
from common.names import format_size

from . import __version__
from .config import RUNTIME_DIR, Config, ConfigError, build_parser, load_config
from .connections import ConnectionRegistry
from .listeners import (
    BindError,
    ListenSpecError,
    bind,
    close_all,
    os_reason,
    parse_listeners,
    unlink_owned,
)
from .notify import sd_notify
from .server import NBDServer
from .tls import TLSConfigError, server_context

log = logging.getLogger("splitd")


class StartupError(Exception):
    """Start-up refused by the system (data directory, runtime directory): exit 1."""


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
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.started = time.time()
        self.listeners = parse_listeners(cfg.listen)
        self.stop_event: asyncio.Event | None = None

    def _make_runtime_dir(self) -> None:
        """Make RUNTIME_DIR if a socket goes there (started by hand with the
        defaults; under systemd, RuntimeDirectory= has made it already)."""
        paths = [lst.path for lst in self.listeners if lst.kind == "unix"]
        paths.append(os.path.abspath(self.cfg.admin_socket))
        if any(os.path.dirname(p) == RUNTIME_DIR for p in paths):
            try:
                os.makedirs(RUNTIME_DIR, 0o750, exist_ok=True)
            except OSError as e:
                raise StartupError(f"cannot make the runtime directory {RUNTIME_DIR}: "
                                   f"{os_reason(e)}") from None

    def info(self) -> dict:
        return {"version": __version__, "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started, 3),
                "data_dir": os.path.abspath(self.cfg.data_dir),
                "listeners": [lst.as_dict() for lst in self.listeners]}

    async def run(self) -> int:
        from controller.pairs import PairManager
        from controller.served import ServedSnapshots
        from controller.service import Controller
        from daemon.admin_server import start_admin_server
        from daemon.exports import VolumeExports
        from daemon.remote_admin import RemoteAdmin
        from volumes.manager import VolumeManager

        cfg = self.cfg
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        tls_context = None
        for lst in self.listeners:
            lst.apply_tls(cfg.tls)
        if any(lst.tls != "off" for lst in self.listeners):
            # load_config refuses a tls mode without both files.
            assert cfg.tls_cert is not None and cfg.tls_key is not None
            tls_context = server_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca,
                                         cfg.tls_verify_peer)
        admin_tls = None
        if cfg.admin_listen:
            # load_config refuses admin_listen without both files.
            assert cfg.tls_cert is not None and cfg.tls_key is not None
            admin_tls = server_context(cfg.tls_cert, cfg.tls_key)

        try:
            manager = VolumeManager(cfg.data_dir)
        except (OSError, sqlite3.Error) as e:
            raise _data_dir_error(e, cfg.data_dir) from None
        pairs = None
        served: ServedSnapshots | None = None
        admin = admin_owned = None
        remote = None
        try:
            # Every spec was checked with the configuration: none fails half-way here.
            for name, size in cfg.ensure_volume:
                vol = manager.find(name)
                if vol is None:
                    manager.create(name, size)
                elif vol.size != size:
                    # Only created, never resized (that is `splitctl volume resize`).
                    log.warning("ensure-volume %s:%s: volume %s exists with %s; left as it is",
                                name, format_size(size), name, format_size(vol.size))
            registry = ConnectionRegistry()
            pairs = PairManager(manager, registry, cfg.copy_rate)
            served = ServedSnapshots(registry, lambda n: manager.find(n) is not None,
                                     manager.store)
            exports = VolumeExports(manager, pairs, cfg.default_export, served)
            server = NBDServer(exports, registry, tls_context=tls_context,
                               max_connections=cfg.max_connections,
                               max_inflight=cfg.max_inflight,
                               reply_memory=cfg.reply_memory,
                               handshake_timeout=cfg.handshake_timeout)
            controller = Controller(manager, registry, self.info, pairs, served)
            self._make_runtime_dir()
            for lst in self.listeners:
                await bind(lst, server.protocol_factory(lst))
                log.info("port %s: listening on %s%s", lst.name, ", ".join(lst.bound),
                         " TLS required" if lst.tls_required else "")
            if cfg.admin_listen and admin_tls is not None:
                # Before the admin socket: a daemon that answers there is fully up.
                remote = RemoteAdmin(cfg.admin_listen, controller, admin_tls, cfg.handshake_timeout)
                await remote.start()
            admin, admin_owned = await start_admin_server(cfg.admin_socket, controller)
        except BaseException:
            # Only what this process bound goes: never a socket of a daemon
            # already serving the path that made this start fail.
            await close_all(self.listeners)
            if remote is not None:
                await remote.stop()
            if admin is not None:
                admin.close()
            if admin_owned is not None:
                unlink_owned(admin_owned)
            if pairs is not None:
                pairs.close()
            if served is not None:
                served.close()
            manager.close()
            raise
        pairs.start()
        served.start()
        log.info("admin socket %s; %d volumes; ready", cfg.admin_socket, len(manager.list()))
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
        if remote is not None:
            await remote.stop()
        await server.shutdown(cfg.shutdown_grace)
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
        assert served is not None
        served.close()
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
        setup_logging(cfg.log_level)
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
