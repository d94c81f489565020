"""splitctl backup serve | unserve | served | files | restore-files: a snapshot
served read-only by the daemon straight from its store (controller/served.py),
and the files of its backed-up directory listed or copied out of it
(agents/backup/files.py); `backup restore --instant` and `restore-status`: a
snapshot restored by the daemon into a new volume usable at once
(controller/instant.py).

The daemon opens the store itself: it must be able to read the store's
directory (and the key file of an encrypted store) at the paths given, made
absolute here.
"""
from __future__ import annotations

import os
import signal
import stat
import sys
import time
import uuid
from argparse import Namespace
from typing import Any

from common.errors import ErrorCode
from common.names import format_size
from splitctl.args import Commands, size as args_size
from splitctl.client import AdminClient, AdminError
from splitctl.commands.backup_agent import ENV_KEY, EXIT_STATUS, _errors, _key_option, _open
from splitctl.commands.port import port_name
from splitctl.output import print_fields, print_table


def _abs(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def _store_params(args: Namespace) -> dict[str, Any]:
    """store, snapshot and key_file as the daemon opens them (absolute paths)."""
    store = getattr(args, "source_store", None) or os.environ.get("SPLITD_BACKUP_STORE")
    if not store:
        raise AdminError(ErrorCode.BAD_INPUT, "which store? give --from DIR or s3://BUCKET/PREFIX "
                                              "(or $SPLITD_BACKUP_STORE)")
    # An s3:// store is opened by the daemon with its own S3 settings (agents/store/s3.py).
    where = store if store.startswith("s3://") else os.path.abspath(store)
    params: dict[str, Any] = {"store": where, "snapshot": args.id}
    key = args.key_file or os.environ.get(ENV_KEY)
    if key:
        params["key_file"] = os.path.abspath(key)
    return params


def _serve(client: AdminClient, args: Namespace, name: str) -> dict[str, Any]:
    params = dict(_store_params(args), name=name)
    if getattr(args, "cache_size", None):
        params["cache_size"] = args.cache_size
    result: dict[str, Any] = client.call("backup.serve", **params)
    return result


# -- serve / unserve / served ---------------------------------------------------------


def run_serve(client: AdminClient, args: Namespace) -> Any:
    return _serve(client, args, args.as_name or f"backup-{args.id}")


def show_serve(r: dict[str, Any], args: Namespace) -> None:
    uris = [u for us in r.get("uris", {}).values() for u in us[:1]]
    print(r["name"])
    print_fields([
        ("snapshot", r["snapshot"]), ("store", r["store"]),
        ("size", format_size(r["size"])), ("chunk size", format_size(r["chunk_size"])),
        ("cache", format_size(r["cache_size"])), ("encrypted", "yes" if r["encrypted"] else "no"),
        ("uris", ", ".join(uris) or "-"),
    ])


def run_unserve(client: AdminClient, args: Namespace) -> Any:
    return client.call("backup.unserve", name=args.name, force=args.force)


def show_unserve(r: dict[str, Any], args: Namespace) -> None:
    closed = r["connections_closed"]
    print(f"stopped serving {r['snapshot']} as {r['name']}"
          + (f" ({closed} connection{'s' if closed != 1 else ''} closed)" if closed else ""))


def run_served(client: AdminClient, args: Namespace) -> Any:
    return client.call("backup.served")


def show_served(r: dict[str, Any], args: Namespace) -> None:
    up = [s for s in r["served"] if s.get("available", True)]
    down = [s for s in r["served"] if not s.get("available", True)]
    print_table(["NAME", "SNAPSHOT", "SIZE", "CACHED", "CONNS", "ERRORS", "STORE"],
                [[s["name"], s["snapshot"], format_size(s["size"]), format_size(s["cached"]),
                  str(s["connections"]), str(s["read_errors"]), s["store"]] for s in up])
    for s in down:
        # Served before the last stop, not (yet) again: why.
        print(f"{s['name']}: unavailable: {s['reason']}")


# -- files / restore-files ------------------------------------------------------------


class _Stop(BaseException):
    """SIGTERM/SIGHUP: unwind, so the snapshot is unserved."""


def _on_signal(signum: int, frame: Any) -> None:
    raise _Stop()


def _with_files(client: AdminClient, args: Namespace, request: dict[str, Any]) -> dict[str, Any]:
    """Serve the snapshot under a name of our own, run `request` on its
    filesystem (agents/backup/files.py), and always unserve."""
    from agents.backup.files import directory_in_image, with_snapshot_fs
    store = _open(args, "source_store")
    with store, _errors():
        manifest = store.manifest(args.id)
    subdir = directory_in_image(manifest)
    name = f"files-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        served = _serve(client, args, name)
        try:
            uris = served["uris"].get(args.port) if args.port else \
                next(iter(served["uris"].values()), None)
            if not uris:
                raise AdminError(ErrorCode.NOT_FOUND, f"the daemon has no port {args.port or ''} "
                                 "to reach the served snapshot through (splitctl port list)")
            with _errors():
                reply = with_snapshot_fs(uris[0], subdir, request,
                                         tls_ca=args.nbd_tls_ca or args.tls_ca)
        finally:
            client.call("backup.unserve", name=name, force=True)
    except _Stop:
        raise AdminError(ErrorCode.ERROR, "stopped by a signal (cleaned up)") from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    reply.update(snapshot=args.id, directory=manifest.get("directory"), in_image=subdir)
    return reply


def run_files(client: AdminClient, args: Namespace) -> Any:
    from agents.backup.files import clean_path
    with _errors():
        path = clean_path(args.path)
    return _with_files(client, args, {"op": "list", "path": path})


def show_files(r: dict[str, Any], args: Namespace) -> None:
    rows = []
    for f in r["files"]:
        mode = stat.filemode(int(f["mode"], 8) | {"dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}
                             .get(f["type"], stat.S_IFREG))
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(f["mtime"]))
        path = f["path"] + (f" -> {f['target']}" if f["type"] == "symlink" else "")
        rows.append([mode, f"{f['uid']}:{f['gid']}", str(f["size"]), when, path])
    print_table(["MODE", "OWNER", "SIZE", "MODIFIED", "PATH"], rows)


def run_restore_files(client: AdminClient, args: Namespace) -> Any:
    from agents.backup.files import clean_path
    with _errors():
        paths = [clean_path(p) for p in args.paths]
    return _with_files(client, args, {"op": "copy", "paths": paths, "to": os.path.abspath(args.to)})


def show_restore_files(r: dict[str, Any], args: Namespace) -> None:
    print(f"restored {len(r['copied'])} path{'s' if len(r['copied']) != 1 else ''} of {r['snapshot']} "
          f"into {r['to']}")


# -- instant restore (controller/instant.py) -------------------------------------------


def run_instant_restore(client: AdminClient, args: Namespace) -> Any:
    """`backup restore ID --instant --to-volume NAME`: the daemon makes the
    volume, usable at once, and restores it in the background; --wait
    waits for the end."""
    params = dict(_store_params(args), volume=args.to_volume)
    if args.rate is not None:
        params["rate"] = args.rate
    started = time.monotonic()
    result: dict[str, Any] = client.call("backup.instant_restore", **params)
    result["usable_after_s"] = round(time.monotonic() - started, 3)
    if args.wait:
        result["final"] = wait_restore(client, args.to_volume, args.interval)
    return result


def wait_restore(client: AdminClient, volume: str, interval: float) -> dict[str, Any]:
    """Wait until the restore of `volume` is done (a progress bar on a
    terminal); PairFailed if it goes to error."""
    from splitctl.commands.pair import WaitDisplay
    display = WaitDisplay(sys.stderr, "restored")
    try:
        return client.wait_restore(volume, interval=interval, on_poll=display.update)
    finally:
        display.close()


def show_instant_restore(r: dict[str, Any], args: Namespace) -> None:
    uris = [u for us in r.get("uris", {}).values() for u in us[:1]]
    final = r.get("final")
    if final is not None:
        print(f"restored snapshot {r['source']['snapshot']} into volume {r['name']}: "
              f"{final['progress']['total']} regions; it stands alone")
        return
    print(f"volume {r['name']} is usable now, read-write ({r['usable_after_s']:.2f} s); "
          f"{r['remaining']} regions of {format_size(r['region_size'])} are restored in the "
          f"background (splitctl backup restore-status {r['name']} --wait)")
    print_fields([("snapshot", r["source"]["snapshot"]), ("store", r["source"]["store"]),
                  ("uris", ", ".join(uris) or "-")])


def run_restore_status(client: AdminClient, args: Namespace) -> Any:
    if args.wait:
        return wait_restore(client, args.volume, args.interval)
    return client.call("backup.restore_status", volume=args.volume)


def show_restore_status(r: dict[str, Any], args: Namespace) -> None:
    from splitctl.output import eta_text, progress_text
    if r["state"] != "restore":
        print(f"volume {r['name']}: {r['state']}" + (f" ({r['reason']})" if r.get("reason") else ""))
        return
    print(f"volume {r['name']}: restoring from snapshot {r['source']['snapshot']}, "
          f"{progress_text(r)}, {format_size(r['copy_rate'])}/s, ETA {eta_text(r)}")


def _from_option(sub: Any) -> None:
    sub.add_argument("--from", dest="source_store", metavar="DIR",
                     help="the backup store (default: $SPLITD_BACKUP_STORE); the daemon opens it")
    _key_option(sub)


def add_commands(backup: Commands) -> None:
    sub = backup.command(
        "serve", run_serve, show_serve, help="export a snapshot read-only, straight from its store",
        description="Have the daemon serve snapshot ID as a read-only NBD export named NAME\n"
                    "(default backup-ID), read straight from the store: no copy first. The\n"
                    "index is loaded once; chunks are fetched, checked and decompressed when\n"
                    "first read, kept in a cache of --cache-size bytes (least recently used\n"
                    "go first), and read ahead on sequential access. base:allocation comes\n"
                    "from the index (zero chunks are holes). A missing or corrupt chunk\n"
                    "fails the reads that need it with EIO (the daemon logs why).\n\n"
                    "The daemon opens the store and the key file itself, at these paths,\n"
                    "and serves the snapshot again after each restart until unserved.\n"
                    "Printed: the export name, then the snapshot, sizes and its URIs.",
        examples="  splitctl backup serve ID --from /srv/backup --as vm1-yesterday\n"
                 "  nbdinfo --map nbd+unix:///vm1-yesterday?socket=/run/splitd/nbd.sock",
        exit_status=EXIT_STATUS)
    sub.add_argument("id", metavar="ID", help="snapshot id (backup list)")
    _from_option(sub)
    sub.add_argument("--as", dest="as_name", metavar="NAME", help="the export's name")
    sub.add_argument("--cache-size", metavar="SIZE", type=args_size, default=None,
                     help="chunk cache bound (default 256M; 16M..64G)")

    sub = backup.command(
        "unserve", run_unserve, show_unserve, help="stop serving a snapshot",
        description="Stop serving the snapshot exported as NAME. Refused while NBD clients\n"
                    "are connected to it, unless --force: then they are disconnected (their\n"
                    "requests in flight fail).",
        examples="  splitctl backup unserve vm1-yesterday", exit_status=EXIT_STATUS)
    sub.add_argument("name", metavar="NAME", help="the export name (backup served)")
    sub.add_argument("--force", action="store_true", help="disconnect its clients")

    sub = backup.command(
        "served", run_served, show_served, help="the snapshots the daemon serves",
        description="Every snapshot the daemon serves: export name, snapshot, store, size,\n"
                    "bytes in its chunk cache, NBD connections, and reads failed with EIO.\n"
                    "Served snapshots are served again after a restart; one whose store\n"
                    "cannot be opened then (or is still being opened) is listed below the\n"
                    "table as unavailable, with the reason (backup unserve forgets it).",
        examples="  splitctl backup served --json", exit_status=EXIT_STATUS)

    sub = backup.command(
        "restore-status", run_restore_status, show_restore_status,
        help="progress of an instant restore",
        description="Progress of the instant restore of VOLUME (backup restore --instant):\n"
                    "state restore with regions done/total, bytes/s and ETA while it runs;\n"
                    "restored once the volume stands alone (the restore's pair is\n"
                    "dissolved); error with the reason if it failed (then delete the volume\n"
                    "and restore again). --wait waits for the end (a progress bar on a\n"
                    "terminal): exit 0 restored, 1 failed.",
        examples="  splitctl backup restore-status vm1 --wait\n"
                 "  splitctl backup restore-status vm1 --json", exit_status=EXIT_STATUS)
    sub.add_argument("volume", metavar="VOLUME", help="the volume being restored")
    sub.add_argument("--wait", action="store_true", help="wait until it is done")
    sub.add_argument("--interval", metavar="SECONDS", type=float, default=1.0,
                     help="(--wait) poll this often (default 1)")

    sub = backup.command(
        "files", run_files, show_files, help="list the files of a snapshot's directory",
        description="List the files under PATH (default: all) of the directory the backup\n"
                    "was made of, as they were in snapshot ID: mode, owner, size, time.\n"
                    "PATH is relative to that directory (for a backup of a whole export,\n"
                    "to its filesystem's root). The snapshot is served by the daemon for\n"
                    "the time of the command and mounted read-only (nbdfuse + loop;\n"
                    "noload for ext3/4) in a private mount namespace; everything is undone\n"
                    "at the end, also on failure. Needs root, nbdfuse, unshare.",
        examples="  splitctl backup files ID --from /srv/backup\n"
                 "  splitctl backup files ID etc/app --from /srv/backup --json",
        exit_status=EXIT_STATUS)
    sub.add_argument("id", metavar="ID", help="snapshot id")
    sub.add_argument("path", metavar="PATH", nargs="?", default=".",
                     help="a file or directory, relative to the backed-up directory")
    _from_option(sub)
    sub.add_argument("--port", metavar="NAME", type=port_name, default=None,
                     help="the daemon's port to read through (default: its first)")
    sub.add_argument("--nbd-tls-ca", metavar="PEM", default=None,
                     help="CA of the NBD server's certificate on a TLS port (default: --tls-ca)")

    sub = backup.command(
        "restore-files", run_restore_files, show_restore_files,
        help="copy files of a snapshot's directory out",
        description="Copy PATHs (files or directories, relative to the backed-up directory;\n"
                    "'.' for all of it) from snapshot ID into DIR, each at its path under\n"
                    "DIR, keeping modes, owners, times, symbolic links, hard links among\n"
                    "the files copied, extended attributes and holes (cp -a). Mounted as\n"
                    "for `backup files`, and always cleaned up.",
        examples="  splitctl backup restore-files ID etc/app.conf data --from /srv/backup \\\n"
                 "      --to /var/tmp/restored",
        exit_status=EXIT_STATUS)
    sub.add_argument("id", metavar="ID", help="snapshot id")
    sub.add_argument("paths", metavar="PATH", nargs="+", help="what to copy")
    _from_option(sub)
    sub.add_argument("--to", metavar="DIR", required=True, help="where to (made if absent)")
    sub.add_argument("--port", metavar="NAME", type=port_name, default=None,
                     help="the daemon's port to read through (default: its first)")
    sub.add_argument("--nbd-tls-ca", metavar="PEM", default=None,
                     help="CA of the NBD server's certificate on a TLS port (default: --tls-ca)")
