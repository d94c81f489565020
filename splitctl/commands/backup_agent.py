"""splitctl backup init | run | list | show | verify | check | forget | prune |
gc | restore: the backup agent (agents/backup) and the store (agents/store)
behind a thin command line.

`backup prepare` (backup.py) makes the group; add_commands() here adds the
rest to it. The agents' packages pull in asyncio, sqlite3, blake3, zstd and
the NBD client: they are imported inside the commands only, so that
`splitctl` itself starts light (tests/splitctl/test_imports.py).

A store is a directory or s3://BUCKET/PREFIX (agents/store/s3.py: endpoint,
region and credentials from $SPLITD_S3_CONFIG or ~/.config/splitd/s3.toml, else
the AWS_* environment): `--store STORE` (or $SPLITD_BACKUP_STORE) for the
commands that look at one, `--to STORE` for run, `--from STORE` for restore. An
encrypted store needs its key file: `--key-file F` (or $SPLITD_BACKUP_KEY).
"""
from __future__ import annotations

import argparse
import os
from argparse import Namespace
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from common.errors import BadInput, ErrorCode, SplitdError
from common.names import format_size
from splitctl.args import EXIT_USAGE, Commands, rate as args_rate
from splitctl.client import ENV_HOST_TLS_CA, ENV_HOST_TOKEN_FILE, AdminClient, AdminError
from splitctl.commands.port import port_name
from splitctl.output import print_fields, print_table

if TYPE_CHECKING:
    from agents.backup import BackupSource
    from agents.store import Store

ENV_STORE = "SPLITD_BACKUP_STORE"
ENV_KEY = "SPLITD_BACKUP_KEY"

EXIT_STATUS = f"""\
exit status:
  0  done
  1  refused or failed: the one-line message says why (the store, the key,
     a missing or corrupt object, the daemon, the host agent, the export)
  {EXIT_USAGE}  the command line is wrong (nothing was done)
  4  the daemon or the host agent could not be reached

With --json, a failure prints {{"error": {{"code": ..., "message": ...}}}} on
stdout as well as the message on stderr.

environment:
  {ENV_STORE}   the store, as --store
  SPLITD_S3_CONFIG  an s3:// store's settings file (TOML: endpoint, region,
                access_key_id, secret_access_key, connections, retry_mode,
                max_attempts; default ~/.config/splitd/s3.toml), else
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL(_S3), AWS_REGION
  {ENV_KEY}     an encrypted store's key file, as --key-file
  {ENV_HOST_TOKEN_FILE}  the host agent's token (run --host), as --host-token-file
  {ENV_HOST_TLS_CA}      the CA of its certificate, as --host-tls-ca
"""


# -- shared ---------------------------------------------------------------------------


@contextmanager
def _errors() -> Iterator[None]:
    """The store's and the agent's errors, as splitctl reports the daemon's:
    exit 1, their code, one line."""
    try:
        yield
    except SplitdError as e:
        raise AdminError(e.code, str(e)) from None
    except OSError as e:
        raise AdminError(ErrorCode.ERROR, f"{e.filename or ''}{': ' if e.filename else ''}"
                                          f"{e.strerror or e}") from None


def _store_dir(args: Namespace, attr: str = "store") -> str:
    path = getattr(args, attr, None) or os.environ.get(ENV_STORE)
    if not path:
        flag = {"store": "--store", "to": "--to", "source_store": "--from"}[attr]
        raise AdminError(ErrorCode.BAD_INPUT, f"which store? give {flag} DIR or s3://BUCKET/PREFIX "
                                                  f"(or ${ENV_STORE})")
    return str(path)


def _open(args: Namespace, attr: str = "store") -> Store:
    from agents.store import open_dir
    path = _store_dir(args, attr)
    with _errors():
        return open_dir(path, key_file=args.key_file or os.environ.get(ENV_KEY) or None)


def _with_store(fn: Callable[[Store, Namespace], Any], attr: str = "store"
                ) -> Callable[[AdminClient, Namespace], Any]:
    def run(client: AdminClient, args: Namespace) -> Any:
        store = _open(args, attr)
        with store, _errors():
            return fn(store, args)
    return run


def _progress(args: Namespace, what: str) -> Any:
    from agents.backup.progress import ProgressBar
    return ProgressBar(what, force=False) if not args.json else None


def _when(m: dict[str, Any]) -> str:
    return str(m.get("created_at", "?"))[:19].replace("T", " ")


# -- init -----------------------------------------------------------------------------


def run_init(client: AdminClient, args: Namespace) -> Any:
    from agents.store import init_dir, new_key_file
    made_key = False
    with _errors():
        if args.encrypt and not os.path.exists(args.encrypt):
            new_key_file(args.encrypt)
            made_key = True
        with init_dir(args.dir, key_file=args.encrypt, chunk_size=args.chunk_size,
                      compression_level=args.level) as store:
            where = args.dir if args.dir.startswith("s3://") else os.path.abspath(args.dir)
            return {"store": where, "store_id": store.id,
                    "chunk_size": store.chunk_size, "compression_level": store.level,
                    "encrypted": store.encrypted, "key_file": args.encrypt, "key_made": made_key}


def show_init(r: dict[str, Any], args: Namespace) -> None:
    enc = "not encrypted"
    if r["encrypted"]:
        enc = f"encrypted with {r['key_file']}" + (" (new key: keep a copy safe)" if r["key_made"] else "")
    print(f"created backup store {r['store']}: chunks of {format_size(r['chunk_size'])}, "
          f"zstd {r['compression_level']}, {enc}")


# -- run ------------------------------------------------------------------------------


def _agent_prepare(args: Namespace) -> dict[str, Any]:
    """The host agent's prepare (backup.py makes the client and the call)."""
    from splitctl.commands.backup import agent_client, run_prepare
    ns = Namespace(host=args.host, dir=args.dir, port=args.port, connect=None, socket=None,
                   token_file=args.host_token_file, tls_ca=args.host_tls_ca,
                   resync=not args.no_resync)
    try:
        agent = agent_client(ns)
    except BadInput as e:
        raise AdminError(ErrorCode.BAD_INPUT, str(e)) from None
    with agent:
        result: dict[str, Any] = run_prepare(agent, ns)
        return result


def _server_of(uri: str) -> str:
    """The daemon as the chain knows it: the NBD server's address."""
    from agents.nbd import parse_uri
    t = parse_uri(uri)
    return f"unix:{t.socket}" if t.socket else f"{t.host}:{t.port}"


def _where_from(client: AdminClient, args: Namespace) -> tuple[str, BackupSource, dict[str, Any]]:
    """(the URI to read, what it is, the prepare/locate answer)."""
    from agents.backup import BackupSource
    if args.volume:
        return args.volume, BackupSource(source=args.source or _server_of(args.volume)), {}
    if args.host:
        info = _agent_prepare(args)
    else:
        info = client.call("locate", name=args.pair, port=args.port)
    uri = info["uri"]
    volume = info.get("primary") or info.get("volume")
    src = BackupSource(source=args.source or _server_of(uri), volume=volume,
                       pair=info.get("pair"), split_gen=info.get("split_gen"),
                       delta_base=info.get("delta_base"), split_time=_iso(info.get("split_at")),
                       pair_created=info.get("created"), directory=info.get("directory"),
                       mountpoint=info.get("mountpoint"))
    return uri, src, info


def _iso(when: Any) -> str | None:
    if when is None:
        return None
    if isinstance(when, (int, float)):
        import time
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    return str(when)


def _nbd_tls(args: Namespace) -> dict[str, Any]:
    ca = args.nbd_tls_ca or (args.host_tls_ca if args.host else args.tls_ca)
    return {"ca_file": ca} if ca else {}


def run_run(client: AdminClient, args: Namespace) -> Any:
    import asyncio

    from agents.backup import backup_export
    uri, src, info = _where_from(client, args)
    store = _open(args, "to")
    bar = _progress(args, "backup")
    with store, _errors():
        try:
            result = asyncio.run(backup_export(
                uri, store, src, full=args.full, require_incremental=args.incremental,
                wait_copy=args.wait_copy, wait_timeout=args.wait_timeout,
                connections=args.connections, progress=bar, tls=_nbd_tls(args)))
        finally:
            if bar is not None:
                bar.done()
    out = result.to_json()
    out.update(uri=uri, source=src.source, pair=src.pair, split_gen=src.split_gen,
               delta_base=src.delta_base)
    if args.host:
        out["freeze_window_ms"] = info.get("window_ms")
        out["prepare"] = info           # the host agent's answer, as backup prepare prints it
    return out


def show_run(r: dict[str, Any], args: Namespace) -> None:
    print(r["snapshot"])
    seconds = max(r["seconds"], 1e-3)
    fields = [
        ("mode", f"{r['mode']}: {r['reason']}"),
        ("image", f"{format_size(r['size'])} from {r['uri']}"
                  + (f" (pair {r['pair']}, split {r['split_gen']})" if r.get("pair") else "")),
        ("read", f"{format_size(r['bytes_read'])} in {r['reads']} requests over "
                 f"{r['connections']} connections"
                 + (f" (delta {format_size(r['delta_bytes'])})" if r["delta_bytes"] is not None else "")),
        ("chunks", f"{r['chunks_read']} read, {r['chunks_zero']} zero, {r['chunks_parent']} from parent"),
        ("stored", f"{format_size(r['new_bytes'])} new, {format_size(r['stored_bytes'])} after "
                   "dedup and compression"),
        ("took", f"{r['seconds']:.1f} s ({format_size(int(r['bytes_read'] / seconds))}/s read)"
                 + (f", {r['waited_s']:.1f} s waiting for the copy" if r["waited_s"] else "")),
    ]
    if r.get("freeze_window_ms") is not None:
        fields.append(("frozen", f"{r['freeze_window_ms']} ms on the host"))
    print_fields(fields)


def check_run(args: Namespace) -> None:
    given = [n for n, v in (("--host", args.host), ("--pair", args.pair), ("--volume", args.volume)) if v]
    if len(given) != 1:
        raise BadInput("give one of --host (with --dir and --port), --pair (with --port) or --volume")
    if args.host and not (args.dir and args.port):
        raise BadInput("--host needs --dir DIR and --port NAME")
    if args.pair and not args.port:
        raise BadInput("--pair needs --port NAME (the port the secondary is read through)")
    if args.no_resync and not args.host:
        raise BadInput("--no-resync goes with --host: only a run through the host agent splits")
    if args.volume and (args.dir or args.port):
        raise BadInput("--volume reads that export directly: drop --dir/--port")
    if args.full and args.incremental:
        raise BadInput("--full and --incremental: give one")
    if args.wait_copy and args.now:
        raise BadInput("--wait-copy and --now: give one")
    if args.connections < 1 or args.connections > 64:
        raise BadInput(f"--connections {args.connections}: give 1 to 64")
    if args.wait_timeout is not None and (args.wait_timeout <= 0 or not args.wait_copy):
        raise BadInput("--wait-timeout goes with --wait-copy and must be positive")


# -- list / show ----------------------------------------------------------------------


def run_list(store: Store, args: Namespace) -> Any:
    return {"snapshots": store.list()}


def show_list(r: dict[str, Any], args: Namespace) -> None:
    rows = []
    for m in r["snapshots"]:
        read = m.get("read") or {}
        rows.append([m["id"], _when(m), m.get("pair") or m.get("volume") or "-",
                     "-" if m.get("split_gen") is None else m["split_gen"],
                     read.get("mode", "-"), format_size(m["size"]),
                     format_size(m["stats"]["new_bytes"]), format_size(m["stats"]["stored_bytes"])])
    print_table(["ID", "CREATED", "PAIR", "SPLIT", "MODE", "SIZE", "NEW", "STORED"], rows,
                right={3, 5, 6, 7}, empty="no snapshots")


def run_show(store: Store, args: Namespace) -> Any:
    return store.show(args.id)


def show_show(r: dict[str, Any], args: Namespace) -> None:
    m, s = r["manifest"], r["sizes"]
    read = m.get("read") or {}
    fields = [
        ("snapshot", m["id"]),
        ("created", f"{m['created_at']} by {m.get('created_by') or '?'}"),
        ("source", str(m.get("source"))),
        ("pair", f"{m.get('pair')} (volume {m.get('volume')}, split {m.get('split_gen')}, "
                 f"delta base {m.get('delta_base')})" if m.get("pair") else "-"),
        ("directory", str(m.get("directory") or "-")),
        ("parent", str(m.get("parent") or "-")),
        ("read", f"{read.get('mode', '?')}: {read.get('reason', '?')}; "
                 f"{format_size(read.get('bytes_read') or 0)} read"),
        ("logical", format_size(s["logical"])),
        ("zero", format_size(s["zero"])),
        ("new data", format_size(s["new_data"])),
        ("stored new", f"{format_size(s['stored_new'])} (after dedup and compression)"),
        ("referenced", f"{format_size(s['referenced_stored'])} stored, {s['distinct_chunks']} "
                       f"distinct chunks of {s['chunks']}"),
        ("digest", m["image_digest"]),
    ]
    print_fields(fields)


# -- verify / check -------------------------------------------------------------------


def _report(report: Any) -> dict[str, Any]:
    out: dict[str, Any] = report.to_json()
    if not report.ok:
        broken = ", ".join(report.broken_snapshots) or "none"
        first = report.problems[0]
        raise _Broken(out, f"{len(report.problems)} bad objects (first: {first.object} {first.what}: "
                           f"{first.why}); broken snapshots: {broken}")
    return out


class _Broken(AdminError):
    """verify/check found problems: exit 1, and the report is printed too."""

    def __init__(self, report: dict[str, Any], message: str):
        super().__init__("corrupt", message)
        self.report = report


def run_verify(store: Store, args: Namespace) -> Any:
    if not 0 < args.sample <= 100:
        raise AdminError(ErrorCode.BAD_INPUT, f"--sample {args.sample}: give a percentage in (0, 100]")
    return _report_or_print(store.verify(args.id, args.sample), args)


def run_check(store: Store, args: Namespace) -> Any:
    return _report_or_print(store.check(read_data=not args.no_read_data), args)


def _report_or_print(report: Any, args: Namespace) -> Any:
    try:
        return _report(report)
    except _Broken as e:
        # The problems, each naming the object and the snapshots it breaks,
        # then the failure line (stderr) and exit 1.
        if not args.json:
            _print_problems(e.report)
        raise


def _print_problems(r: dict[str, Any]) -> None:
    for p in r["problems"]:
        print(f"{p['what']}: {p['object']}: {p['why']}; breaks {', '.join(p['snapshots']) or 'no snapshot'}")


def show_verify(r: dict[str, Any], args: Namespace) -> None:
    print(f"ok: {len(r['snapshots'])} snapshots, {r['chunks_checked']} chunks "
          f"({format_size(r['bytes_checked'])}) read and re-hashed")
    if r.get("unreferenced_chunks"):
        print(f"{r['unreferenced_chunks']} chunks no snapshot refers to (backup gc removes them)")


# -- forget / prune / gc --------------------------------------------------------------


def run_forget(store: Store, args: Namespace) -> Any:
    for sid in args.ids:
        store.manifest(sid)         # a name that is no snapshot is an error, not a no-op
    removed = store.forget(args.ids)
    gc = store.gc() if args.gc else None
    return {"forgotten": removed, "gc": None if gc is None else vars(gc)}


def show_forget(r: dict[str, Any], args: Namespace) -> None:
    print(f"forgot {len(r['forgotten'])} snapshots: {', '.join(r['forgotten'])}")
    if r["gc"]:
        _show_gc_line(r["gc"])


def run_prune(store: Store, args: Namespace) -> Any:
    from agents.store import RetentionPolicy
    policy = RetentionPolicy(last=args.keep_last, hourly=args.keep_hourly, daily=args.keep_daily,
                             weekly=args.keep_weekly, monthly=args.keep_monthly, yearly=args.keep_yearly)
    plan, gc = store.prune(policy, dry_run=args.dry_run)
    return {"dry_run": args.dry_run,
            "keep": [{"id": m["id"], "kept_by": m.get("kept_by")} for m in plan.keep],
            "remove": [m["id"] for m in plan.remove],
            "gc": None if gc is None else vars(gc)}


def show_prune(r: dict[str, Any], args: Namespace) -> None:
    verb = "would remove" if r["dry_run"] else "removed"
    for k in r["keep"]:
        print(f"keep    {k['id']}  ({', '.join(k['kept_by'] or [])})")
    for sid in r["remove"]:
        print(f"{'remove' if r['dry_run'] else 'removed'} {sid}")
    print(f"{verb} {len(r['remove'])} snapshots, kept {len(r['keep'])}")
    if r["gc"]:
        _show_gc_line(r["gc"])


def run_gc(store: Store, args: Namespace) -> Any:
    return vars(store.gc(dry_run=args.dry_run))


def _show_gc_line(g: dict[str, Any]) -> None:
    verb = "would delete" if g["dry_run"] else "deleted"
    print(f"gc: {verb} {g['deleted_chunks']} of {g['unreferenced_chunks']} unreferenced chunks "
          f"({format_size(g['deleted_bytes'])}), {len(g['deleted_indexes'])} indexes; "
          f"{g['marked_chunks']} chunks in use by {g['snapshots']} snapshots"
          + (f", {g['live_leases']} backups running" if g["live_leases"] else ""))


def show_gc(r: dict[str, Any], args: Namespace) -> None:
    _show_gc_line(r)


# -- restore --------------------------------------------------------------------------


def run_restore(client: AdminClient, args: Namespace) -> Any:
    if args.instant:
        from splitctl.commands.backup_served import run_instant_restore
        return run_instant_restore(client, args)
    import asyncio

    from agents.backup import restore_to_file, restore_to_uri
    store = _open(args, "source_store")
    with store, _errors():
        manifest = store.manifest(args.id)
        bar = _progress(args, "restore")
        created = False
        try:
            if args.to_volume:
                uri, created = _target_volume(client, args, manifest["size"])
                result = asyncio.run(restore_to_uri(store, args.id, uri, connections=args.connections,
                                                    check=not args.no_check, readback=args.verify_readback,
                                                    progress=bar, tls=_nbd_tls_restore(args)))
            elif "://" in args.to:
                result = asyncio.run(restore_to_uri(store, args.id, args.to, connections=args.connections,
                                                    check=not args.no_check, readback=args.verify_readback,
                                                    progress=bar, tls=_nbd_tls_restore(args)))
            else:
                result = restore_to_file(store, args.id, args.to, check=not args.no_check,
                                         readback=args.verify_readback, progress=bar)
        finally:
            if bar is not None:
                bar.done()
    out = result.to_json()
    out["volume_created"] = created
    return out


def _nbd_tls_restore(args: Namespace) -> dict[str, Any]:
    ca = args.nbd_tls_ca or args.tls_ca
    return {"ca_file": ca} if ca else {}


def _target_volume(client: AdminClient, args: Namespace, size: int) -> tuple[str, bool]:
    """The NBD URI of --to-volume through --port (the daemon's first port by
    default), made first with --create."""
    created = False
    if args.create:
        client.call("volume.create", name=args.to_volume, size=size)
        created = True
    port = args.port
    if port is None:
        ports = client.call("port.list")["ports"]
        if not ports:
            raise AdminError(ErrorCode.NOT_FOUND, "the daemon has no NBD port to restore through")
        port = ports[0]["name"]
    info = client.call("locate", name=args.to_volume, port=port, role="primary")
    return str(info["uri"]), created


def show_restore(r: dict[str, Any], args: Namespace) -> None:
    if args.instant:
        from splitctl.commands.backup_served import show_instant_restore
        show_instant_restore(r, args)
        return
    check = {"read-back": "image digest of what was written and read back matched",
             "written": "image digest of what was written matched"}.get(
        r["check"], "image digest not checked (--no-check)")
    made = " (volume created)" if r.get("volume_created") else ""
    print(f"restored {r['snapshot']} to {r['target']}{made}: {format_size(r['bytes_written'])} "
          f"written, {format_size(r['bytes_zeroed'])} zeroes, {r['seconds']:.1f} s; {check}")


def check_restore(args: Namespace) -> None:
    if bool(args.to_volume) == bool(args.to):
        raise BadInput("give one of --to-volume NAME or --to URI|FILE")
    if args.create and not args.to_volume:
        raise BadInput("--create goes with --to-volume")
    if args.port and not args.to_volume:
        raise BadInput("--port goes with --to-volume")
    if args.connections < 1 or args.connections > 64:
        raise BadInput(f"--connections {args.connections}: give 1 to 64")
    if args.no_check and args.verify_readback:
        raise BadInput("--no-check and --verify-readback: give one")
    if args.instant:
        if not args.to_volume:
            raise BadInput("--instant goes with --to-volume NAME (a new volume)")
        if args.port or args.no_check or args.verify_readback:
            raise BadInput("--port, --no-check and --verify-readback do not go with --instant "
                           "(the daemon restores)")
    else:
        for flag, value in (("--wait", args.wait), ("--rate", args.rate is not None)):
            if value:
                raise BadInput(f"{flag} goes with --instant")


# -- the commands ---------------------------------------------------------------------


def _no_daemon(args: Namespace) -> AdminClient:
    """The store commands ask no daemon: a client never connected (it
    connects at its first call), and none of the daemon's options."""
    return AdminClient()


def _key_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--key-file", metavar="FILE", default=None,
                     help=f"an encrypted store's key file (default: ${ENV_KEY})")


def _store_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--store", metavar="STORE", default=None,
                     help=f"the backup store, a directory or s3://BUCKET/PREFIX (default: ${ENV_STORE})")
    _key_option(sub)


def _keep(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: give a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: must not be negative")
    return n


def _chunk_size(text: str) -> int:
    from common.names import parse_size
    try:
        return parse_size(text, "chunk size")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


KEEP_HELP = {"last": "keep the N newest", "hourly": "keep the newest of each of N hours",
             "daily": "keep the newest of each of N days", "weekly": "keep the newest of each of N weeks",
             "monthly": "keep the newest of each of N months",
             "yearly": "keep the newest of each of N years"}


def add_commands(backup: Commands) -> None:
    sub = backup.command(
        "init", run_init, show_init, help="create a backup store in a directory or on S3",
        description="Create an empty backup store in a directory (made if absent) or at\n"
                    "s3://BUCKET/PREFIX (the bucket must exist); refused if a store is there.\n"
                    "Chunks are fixed-size pieces of the image (aligned to volume offsets),\n"
                    "named by a keyed BLAKE3 hash, stored once (dedup), zstd-compressed,\n"
                    "never changed. With --encrypt KEYFILE every object is\n"
                    "sealed with AES-256-GCM under a key derived from KEYFILE (made, 32\n"
                    "random bytes, if it does not exist): keep it safe, without it the\n"
                    "store cannot be read.",
        examples="  splitctl backup init /srv/backup\n"
                 "  splitctl backup init /srv/backup-enc --encrypt /etc/splitd/backup.key\n"
                 "  AWS_ENDPOINT_URL=http://s3.lan:8333 splitctl backup init s3://backups/db1",
        exit_status=EXIT_STATUS, client=_no_daemon)
    sub.add_argument("dir", metavar="STORE", help="the store: a directory or s3://BUCKET/PREFIX")
    sub.add_argument("--encrypt", metavar="KEYFILE", default=None,
                     help="encrypt with this key file (made if absent)")
    sub.add_argument("--chunk-size", metavar="SIZE", type=_chunk_size, default=4 << 20,
                     help="chunk size, a multiple of 4 KiB up to 64 MiB (default 4M)")
    sub.add_argument("--level", metavar="N", type=int, default=1, help="zstd level 1..19 (default 1)")

    sub = backup.command(
        "run", run_run, show_run, check=check_run,
        help="back up a directory (via its host), a split pair, or an export",
        description="Stream an image into a backup store as a new snapshot, in one of three\n"
                    "ways:\n"
                    "  --host HOST --dir DIR --port NAME   ask the host agent there to prepare\n"
                    "      DIR (freeze, split, thaw: splitctl backup prepare) and read the\n"
                    "      secondary through the daemon's port NAME (application-consistent).\n"
                    "      The split image stays until the next run: that run first resyncs\n"
                    "      the pair (releasing the previous split image; the delta chain is\n"
                    "      kept), then splits it again. So run the backups of a pair one at\n"
                    "      a time; --no-resync refuses a pair still split instead;\n"
                    "  --pair PAIR --port NAME   read a pair that is split already, found with\n"
                    "      the daemon's locate (--socket/--connect; a read token suffices);\n"
                    "  --volume URI   read any NBD export as it is (crash-consistent; always a\n"
                    "      full read, deduplicated against the store).\n\n"
                    "Only allocated data is read (base:allocation); zero chunks and holes\n"
                    "are not stored. Incremental forever: when the newest snapshot in the\n"
                    "store of the same source and pair is of the split this split's delta\n"
                    "starts from (its split_gen == this split's delta_base), only the\n"
                    "x-splitd:delta regions are read and every other chunk is taken from\n"
                    "that snapshot's index; otherwise everything is read (deduplicated) and\n"
                    "the reason is printed: no earlier backup, a generation gap, a pair\n"
                    "that went through error or a full resync, a missing parent. --full\n"
                    "always reads everything; --incremental refuses instead of falling back.\n\n"
                    "--wait-copy waits until the secondary holds every region (pending = 0,\n"
                    "from x-splitd:pending) before reading; --now (the default) reads at once,\n"
                    "the pair's read policy serving regions not copied yet.\n\n"
                    "A progress bar (bytes, rate, ETA) is drawn on stderr when it is a\n"
                    "terminal. Printed: the snapshot id, then what was read and stored;\n"
                    "--json: snapshot, mode, reason, parent, size, bytes_read, reads,\n"
                    "block_status, delta_bytes, chunks_read/zero/parent, new_bytes,\n"
                    "stored_bytes, connections, waited_s, seconds, uri, source, pair,\n"
                    "split_gen, delta_base; with --host also freeze_window_ms and prepare\n"
                    "(the agent's answer, as backup prepare prints it).\n\n"
                    "A run that fails commits nothing; the chunks it stored are reused by\n"
                    "the next run.",
        examples="  splitctl backup run --host app1 --dir /srv/db --port backup --to /srv/backup \\\n"
                 "      --host-token-file app1.token --host-tls-ca ca.pem --wait-copy\n"
                 "  splitctl backup run --pair db-s --port backup --to /srv/backup\n"
                 "  splitctl backup run --volume nbd://storage1/vm1 --to /srv/backup --json",
        exit_status=EXIT_STATUS)
    # What to back up: one of these three (check_run). Not an argument group:
    # splitctl's parser knows only the options added to it directly.
    sub.add_argument("--host", metavar="HOST[:PORT]", help="the application host's agent")
    sub.add_argument("--pair", metavar="PAIR", help="a split pair on the daemon")
    sub.add_argument("--volume", metavar="URI", help="an NBD export, read as it is")
    sub.add_argument("--dir", metavar="DIR", help="(--host) the directory to back up")
    sub.add_argument("--no-resync", action="store_true",
                     help="(--host) refuse a pair still split by the previous run (pair-state) "
                          "instead of resyncing it first")
    sub.add_argument("--port", metavar="NAME", type=port_name,
                     help="the daemon's port the secondary is read through")
    sub.add_argument("--to", metavar="STORE",
                     help=f"the backup store, a directory or s3://BUCKET/PREFIX (default: ${ENV_STORE})")
    _key_option(sub)
    sub.add_argument("--full", action="store_true", help="read everything")
    sub.add_argument("--incremental", action="store_true",
                      help="read only the delta; refuse if the chain cannot be trusted")
    sub.add_argument("--wait-copy", action="store_true", help="wait for pending = 0 first")
    sub.add_argument("--now", action="store_true", help="read at once (the default)")
    sub.add_argument("--wait-timeout", metavar="SECONDS", type=float, default=None,
                     help="(--wait-copy) give up after this long (default: no limit)")
    sub.add_argument("--connections", metavar="N", type=int, default=4,
                     help="NBD connections where the export allows multi-conn (default 4)")
    sub.add_argument("--source", metavar="NAME",
                     help="the daemon's name in the store (default: the NBD server's address)")
    sub.add_argument("--host-token-file", metavar="FILE",
                     default=os.environ.get(ENV_HOST_TOKEN_FILE),
                     help=f"(--host) the agent's token (default: ${ENV_HOST_TOKEN_FILE})")
    sub.add_argument("--host-tls-ca", metavar="PEM", default=os.environ.get(ENV_HOST_TLS_CA),
                     help=f"(--host) CA of the agent's certificate (default: ${ENV_HOST_TLS_CA})")
    sub.add_argument("--nbd-tls-ca", metavar="PEM", default=None,
                     help="CA of the NBD server's certificate for nbds:// (default: "
                          "--host-tls-ca with --host, else --tls-ca)")

    sub = backup.command(
        "list", _with_store(run_list), show_list, help="the snapshots in a store",
        description="Every snapshot in the store, oldest first: id, when it was made, the\n"
                    "pair (or volume), the split generation, full or incremental, the\n"
                    "image size, the data it added and what that takes after dedup and\n"
                    "compression. --json: the manifests.",
        examples="  splitctl backup list --store /srv/backup",
        exit_status=EXIT_STATUS, client=_no_daemon)
    _store_option(sub)

    sub = backup.command(
        "show", _with_store(run_show), show_show, help="one snapshot: manifest and sizes",
        description="A snapshot's manifest and sizes: logical (the image), zero (never\n"
                    "stored), new data (what it added to the store) and stored new (that\n"
                    "after dedup and compression), and what every chunk it refers to takes.",
        examples="  splitctl backup show 20261202T130501.042Z-1a2b3c4d --store /srv/backup",
        exit_status=EXIT_STATUS, client=_no_daemon)
    sub.add_argument("id", metavar="ID", help="snapshot id (backup list)")
    _store_option(sub)

    sub = backup.command(
        "verify", _with_store(run_verify), show_verify, help="re-read and re-hash a snapshot's chunks",
        description="Check a snapshot: its manifest, its index against the manifest's image\n"
                    "digest, and its chunks, each read back, opened and re-hashed (all, or a\n"
                    "random --sample percent). Every missing or corrupt object is named with\n"
                    "the snapshots it breaks; then exit 1.",
        examples="  splitctl backup verify 20261202T130501.042Z-1a2b3c4d --store /srv/backup\n"
                 "  splitctl backup verify ID --sample 5",
        exit_status=EXIT_STATUS, client=_no_daemon)
    sub.add_argument("id", metavar="ID", help="snapshot id")
    sub.add_argument("--sample", metavar="PCT", type=float, default=100.0,
                     help="check this percentage of its distinct chunks (default 100)")
    _store_option(sub)

    sub = backup.command(
        "check", _with_store(run_check), show_verify, help="verify the whole store",
        description="Verify every snapshot of the store (each chunk once), and count the\n"
                    "chunks no snapshot refers to (what gc would remove). Problems are\n"
                    "named with the snapshots they break; then exit 1.",
        examples="  splitctl backup check --store /srv/backup",
        exit_status=EXIT_STATUS, client=_no_daemon)
    sub.add_argument("--no-read-data", action="store_true",
                     help="only check that every chunk is there (do not read them)")
    _store_option(sub)

    sub = backup.command(
        "forget", _with_store(run_forget), show_forget, help="remove snapshots",
        description="Remove snapshots by id (their manifests; every other snapshot stays\n"
                    "complete: each has a full index). Their data goes at the next gc (or\n"
                    "now, with --gc).",
        examples="  splitctl backup forget ID1 ID2 --store /srv/backup --gc",
        exit_status=EXIT_STATUS, client=_no_daemon)
    sub.add_argument("ids", metavar="ID", nargs="+", help="snapshot ids")
    sub.add_argument("--gc", action="store_true", help="collect garbage afterwards")
    _store_option(sub)

    sub = backup.command(
        "prune", _with_store(run_prune), show_prune, help="remove snapshots by retention rules",
        description="Keep, for each source and pair, the snapshots the rules name and remove\n"
                    "the rest, then collect garbage (mark and sweep, safe while backups run).\n"
                    "--keep-last N: the N newest; --keep-daily N: the newest of each of the\n"
                    "last N days that have one (likewise hourly, weekly, monthly, yearly).\n"
                    "At least one rule is needed. --dry-run: only say what would go.",
        examples="  splitctl backup prune --keep-last 3 --keep-daily 7 --keep-weekly 4 \\\n"
                 "      --keep-monthly 12 --store /srv/backup --dry-run",
        exit_status=EXIT_STATUS, client=_no_daemon)
    for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        sub.add_argument(f"--keep-{rule}", metavar="N", type=_keep, default=0,
                         help=KEEP_HELP[rule])
    sub.add_argument("--dry-run", action="store_true", help="change nothing")
    _store_option(sub)

    sub = backup.command(
        "gc", _with_store(run_gc), show_gc, help="delete chunks no snapshot uses",
        description="Mark every chunk an index of a snapshot (or of a running backup's\n"
                    "parent) refers to, and delete the others that are older than the\n"
                    "oldest running backup: safe while backups are being written.",
        examples="  splitctl backup gc --store /srv/backup",
        exit_status=EXIT_STATUS, client=_no_daemon)
    sub.add_argument("--dry-run", action="store_true", help="only count")
    _store_option(sub)

    sub = backup.command(
        "restore", run_restore, show_restore, check=check_restore,
        help="write a snapshot into a volume, an export or a file",
        description="Write snapshot ID back: into a splitd volume (--to-volume NAME, made\n"
                    "first with --create, reached through the daemon's --port, its first\n"
                    "port by default), into any NBD export (--to URI), or into a file\n"
                    "(--to FILE: a sparse raw image; a block device works too). Chunks are\n"
                    "fetched and decompressed in parallel and written with many requests in\n"
                    "flight over several connections; zero runs are written as WRITE_ZEROES\n"
                    "(holes in a file); a file or block device is written with O_DIRECT\n"
                    "where its file system allows. Every chunk is checked against its name\n"
                    "as it is read, and at the end the image digest of what was written\n"
                    "(each chunk's id at its offset, zero runs included) is compared with\n"
                    "the snapshot's. --verify-readback then reads the whole target back\n"
                    "and compares its digest too: that proves the target returns what it\n"
                    "was given, at the cost of a second pass. A missing or corrupt chunk\n"
                    "does not stop the restore: the rest is written, then the command\n"
                    "fails naming each bad chunk and the byte ranges of the image\n"
                    "(offset+length) left unwritten.\n\n"
                    "--instant --to-volume NAME: the daemon makes volume NAME (the\n"
                    "snapshot's size; it must not exist) and it is usable at once,\n"
                    "read-write, whatever its size, while the daemon restores it in the\n"
                    "background: a read of a region not yet restored is restored first from\n"
                    "the store (copy-on-read), a write fills its region first, the copy\n"
                    "engine does the rest at --rate. It is a pair in state restore named\n"
                    "NAME (splitctl pair show NAME; pair set NAME --rate), kept across\n"
                    "restarts (the daemon opens the store and key file again, at the paths\n"
                    "given, made absolute). When done the pair is dissolved and the volume\n"
                    "stands alone. A missing or corrupt chunk, or a store that cannot be\n"
                    "opened at restart, puts it in state error with the reason: regions not\n"
                    "restored then fail with EIO (never wrong bytes); delete the pair and\n"
                    "the volume and restore again. A wrong key or a taken name is refused\n"
                    "with nothing made. --wait waits until it is restored (a progress bar on\n"
                    "a terminal); else see splitctl backup restore-status NAME.",
        examples="  splitctl backup restore ID --from /srv/backup --to-volume vm1-restored --create\n"
                 "  splitctl backup restore ID --from /srv/backup --to-volume vm1 --instant --wait\n"
                 "  splitctl backup restore ID --from /srv/backup --to nbd://storage1/vm1\n"
                 "  splitctl backup restore ID --from /srv/backup --to /var/tmp/vm1.img",
        exit_status=EXIT_STATUS)
    sub.add_argument("id", metavar="ID", help="snapshot id")
    sub.add_argument("--from", dest="source_store", metavar="STORE",
                     help=f"the backup store, a directory or s3://BUCKET/PREFIX (default: ${ENV_STORE})")
    _key_option(sub)
    sub.add_argument("--to-volume", metavar="NAME", help="a splitd volume (the daemon's admin API)")
    sub.add_argument("--create", action="store_true", help="(--to-volume) make the volume first")
    sub.add_argument("--port", metavar="NAME", type=port_name, help="(--to-volume) the port to write through")
    sub.add_argument("--to", metavar="URI|FILE", help="an NBD URI, or a file")
    sub.add_argument("--connections", metavar="N", type=int, default=4,
                     help="NBD connections where the export allows multi-conn (default 4)")
    sub.add_argument("--no-check", action="store_true",
                     help="do not compare the image digest at the end (chunks are still checked)")
    sub.add_argument("--verify-readback", action="store_true",
                     help="also read the whole target back and compare its image digest")
    sub.add_argument("--instant", action="store_true",
                     help="(--to-volume) a new volume, usable at once, restored in the background")
    sub.add_argument("--rate", metavar="RATE", type=args_rate, default=None,
                     help="(--instant) background restore rate, bytes/s (default unlimited)")
    sub.add_argument("--wait", action="store_true",
                     help="(--instant) wait until restored, with a progress bar on a terminal")
    sub.add_argument("--interval", metavar="SECONDS", type=float, default=1.0,
                     help="(--instant --wait) poll this often (default 1)")
    sub.add_argument("--nbd-tls-ca", metavar="PEM", default=None,
                     help="CA of the NBD server's certificate for nbds:// (default: --tls-ca)")
