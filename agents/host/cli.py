"""splitd-host: the agent on the application host.

Commands here: attach, detach, list, prepare, thaw-all. The service commands
(serve, token) live in their own modules, each registered by one line in
COMMAND_MODULES: a module with add_commands(commands, common), where
`commands` is the subparsers object and `common` the parent parser holding
--state-dir and --json; each command sets `run=FUNCTION(args) -> exit status`.

Exit status: 0 done, 1 refused or failed, 2 the command line is wrong,
4 the daemon could not be reached.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from agents.host import service, tokens_cmd
from agents.host.attach import AttachError, Attachments, attach, detach, status
from agents.host.prepare import PrepareError, prepare
from agents.host.rcu import restore_leftover
from agents.host.state import (
    DEFAULT_FREEZE_TIMEOUT,
    DEFAULT_STATE_DIR,
    ENV_STATE_DIR,
    HookConfig,
    HostState,
    default_state_dir,
)
from agents.host.watchdog import WatchdogError, thaw_leftovers

__all__ = ["main", "build_parser", "COMMAND_MODULES", "emit", "fail", "EXIT_FAILED",
           "EXIT_USAGE", "EXIT_UNREACHABLE"]

PROG = "splitd-host"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 4


def emit(args: argparse.Namespace, result: Any, text: str) -> int:
    """Print `result` as JSON with --json, else `text`; exit status 0."""
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif text:
        print(text)
    return 0


def fail(args: argparse.Namespace, code: str, message: str, status: int = EXIT_FAILED) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": code, "message": message}}, indent=2))
    print(f"{PROG}: {message}", file=sys.stderr)
    return status


# -- attach, detach, list ----------------------------------------------------------------

def _attach(args: argparse.Namespace) -> int:
    try:
        att = attach(Attachments(args.state_dir), args.volume, args.daemon, nbd_uri=args.nbd,
                     port=args.port, token_file=args.token_file, tls_ca=args.tls_ca,
                     tls_certificates=args.tls_certificates,
                     mount=args.mount, read_only=args.read_only)
    except AttachError as e:
        return fail(args, e.code, e.message,
                    EXIT_USAGE if e.code == "bad-input" else EXIT_FAILED)
    return emit(args, att.as_dict(), f"attached {att.describe()}: {att.nbd_uri}")


def _detach(args: argparse.Namespace) -> int:
    try:
        att = detach(Attachments(args.state_dir), args.target)
    except AttachError as e:
        return fail(args, e.code, e.message)
    return emit(args, att.as_dict(), f"detached {att.describe()}")


def _list(args: argparse.Namespace) -> int:
    rows = [status(a) for a in Attachments(args.state_dir).list()]
    if args.json:
        return emit(args, {"attachments": rows}, "")
    if not rows:
        print("nothing attached")
        return 0
    table = [("DEVICE", "VOLUME", "DAEMON", "MOUNTED AT", "STATE")]
    for r in rows:
        what = "alive" if r["alive"] else "BROKEN: " + ", ".join(
            k for k, ok in (("device gone", r["device_ok"]), ("nbdfuse gone", r["nbdfuse_ok"]),
                            ("not mounted", r["mounted"] or not r["mountpoint"])) if not ok)
        table.append((r["device"], r["volume"], r["daemon"], r["mountpoint"] or "-", what))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


# -- prepare, thaw-all -------------------------------------------------------------------

def report_thawed(thawed: list[dict], rcu_restored: str | None = None) -> None:
    """What a previous agent left frozen and this one thawed, and the RCU
    knob it left set, on stderr."""
    for t in thawed:
        print(f"{PROG}: {t['mountpoint']} was left frozen by agent pid {t.get('agent_pid')} "
              f"(watchdog pid {t.get('watchdog_pid')}): {t['result']}", file=sys.stderr)
    if rcu_restored:
        print(f"{PROG}: {rcu_restored}", file=sys.stderr)


def _prepare(args: argparse.Namespace) -> int:
    hook = HookConfig(args.hook, args.hook_timeout) if args.hook else HookConfig()
    with HostState.open(args.state_dir, hook=hook, freeze_timeout=args.timeout,
                        expedite=args.expedite) as state:
        report_thawed(state.thawed_at_start, state.rcu_restored)
        try:
            answer = prepare(state, args.directory, args.port, timeout=args.timeout,
                             resync=args.resync)
        except PrepareError as e:
            return fail(args, e.code, e.message, EXIT_UNREACHABLE if e.code ==
                        "daemon-unreachable" else EXIT_FAILED)
    answer["thawed_at_start"] = state.thawed_at_start
    split_gen = "-" if answer["split_gen"] is None else answer["split_gen"]
    return emit(args, answer, f"{answer['uri']}\n  pair {answer['pair']}, split generation "
                              f"{split_gen}; froze {answer['mountpoint']} for "
                              f"{answer['window_ms']} ms (FIFREEZE {answer['freeze_ms']} ms), "
                              f"prepare {answer['prepare_ms']} ms"
                + "".join(f"\n  warning: {w}" for w in answer["warnings"]))


def _thaw_all(args: argparse.Namespace) -> int:
    thawed = thaw_leftovers(args.state_dir, include_live=args.force)
    text = "\n".join(f"{t['mountpoint']}: {t['result']} (left by agent pid {t.get('agent_pid')})"
                     for t in thawed) or "nothing was left frozen"
    answer: dict = {"thawed": thawed}
    rcu = restore_leftover(args.state_dir)
    if rcu:
        answer["rcu"] = rcu
        text += "\n" + rcu
    emit(args, answer, text)
    return EXIT_FAILED if any(t["result"].startswith("failed") for t in thawed) else 0


EXPEDITE_HELP = ("leave RCU grace periods alone during FIFREEZE (by default "
                 "/sys/kernel/rcu_expedited is set to 1 for the FIFREEZE call only, if it was 0: "
                 "FIFREEZE waits for three grace periods, ~12 ms each at HZ=250; expedited, "
                 "tens of microseconds, at the cost of an IPI to every CPU)")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} s: give more than 0 and at most 3600")
    return value


def _add_local_commands(commands, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "attach", parents=[common], help="attach a volume as a local block device",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Attach VOLUME of a splitd daemon as a block device: with nbd-client\n"
                    "where /dev/nbd* exists, else nbdfuse (a FUSE file in the state\n"
                    "directory) and a loop device. The record of which device is which\n"
                    "volume of which daemon is what `prepare` finds the volume by.",
        epilog="examples:\n"
               "  splitd-host attach db --daemon /run/splitd/admin.sock --port local "
               "--mount /srv/db\n"
               "  splitd-host attach db --daemon tcp://storage:10810 --token-file host.token \\\n"
               "      --tls-ca ca.pem --port app --mount /srv/db\n"
               "  splitd-host attach db --daemon tcp://storage:10810 --token-file host.token \\\n"
               "      --tls-ca ca.pem --port app-tls --tls-certificates /etc/splitd/nbd-certs\n"
               "  splitd-host attach db --daemon /run/splitd/admin.sock \\\n"
               "      --nbd 'nbd+unix:///db?socket=/run/splitd/nbd.sock'")
    p.add_argument("volume", metavar="VOLUME", help="the volume's name in the daemon")
    p.add_argument("--daemon", metavar="ADMIN", required=True,
                   help="the daemon's admin endpoint: its Unix socket path, or tcp://HOST:PORT "
                        "(TLS, with --token-file)")
    p.add_argument("--token-file", metavar="FILE", help="bearer token for a tcp:// daemon")
    p.add_argument("--tls-ca", metavar="CA", help="CA certificate of a tcp:// daemon")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--nbd", metavar="URI", help="the export's NBD URI, as given")
    how.add_argument("--port", metavar="NAME",
                     help="ask the daemon for the volume's URI through its port NAME (locate)")
    p.add_argument("--mount", metavar="DIR", help="mount the device's filesystem on DIR")
    p.add_argument("--tls-certificates", metavar="DIR",
                   help="for an export that needs TLS (nbds://) whose certificate a private "
                        "CA signed: DIR in libnbd's layout (ca-cert.pem; client-cert.pem and "
                        "client-key.pem if the server wants them). nbdfuse is then run through "
                        "nbdkit's nbd plugin, which takes it (nbd-client: -cacertfile "
                        "DIR/ca-cert.pem)")
    p.add_argument("--read-only", action="store_true", help="attach (and mount) read-only")
    p.set_defaults(run=_attach)

    p = commands.add_parser(
        "detach", parents=[common], help="unmount and detach an attached volume",
        description="Unmount (refused if busy), detach the device, stop nbdfuse, drop the "
                    "record. TARGET is the device, the volume name or the mount point.")
    p.add_argument("target", metavar="DEVICE|VOLUME|DIR")
    p.set_defaults(run=_detach)

    p = commands.add_parser("list", parents=[common], help="list attached volumes",
                            description="The attachment records, and whether each is alive "
                                        "(device present, nbdfuse running, mounted).")
    p.set_defaults(run=_list)

    p = commands.add_parser(
        "prepare", parents=[common], help="freeze, split, thaw: a consistent secondary",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Find the filesystem holding DIR and the splitd volume under it, run\n"
                    "the pre-freeze hook, freeze it, split its pair (or the pair's group),\n"
                    "thaw, run the post-thaw hook, and print the secondary's NBD URI\n"
                    "through the daemon's port NAME. Runs here, without the service; a\n"
                    "watchdog process thaws after --timeout whatever happens.",
        epilog="the answer (--json): uri, uris, port, tls (of the secondary through the\n"
               "port), pair, group, volume, directory, mountpoint, device, split_gen,\n"
               "delta_base, generation, split_at, state, resynced (--resync), frozen_at\n"
               "(epoch s), freeze_ms (the FIFREEZE\n"
               "call), window_ms (FIFREEZE start to FITHAW end), expedited (RCU grace\n"
               "periods were expedited during FIFREEZE), prepare_ms, warnings\n"
               "(a failed post-thaw hook), thawed_at_start (what a dead agent had left\n"
               "frozen, thawed before this prepare).\n\n"
               "error codes (--json: {\"error\": {\"code\", \"message\"}}): not-found,\n"
               "not-splitd, busy, bad-config, daemon-unreachable (exit 4), daemon-refused,\n"
               "pair-error, pair-state, hook-failed, freeze-failed, split-failed,\n"
               "watchdog-thawed, watchdog-failed. Nothing is left frozen after any of them.\n\n"
               "example:\n  splitd-host prepare /srv/db --port backup --json")
    p.add_argument("directory", metavar="DIR", help="a directory on an attached volume")
    p.add_argument("--port", metavar="NAME", required=True,
                   help="the daemon's port whose URI of the secondary to answer with")
    p.add_argument("--timeout", type=_positive, default=DEFAULT_FREEZE_TIMEOUT, metavar="S",
                   help=f"longest freeze before the watchdog thaws (default "
                        f"{DEFAULT_FREEZE_TIMEOUT:g})")
    p.add_argument("--hook", metavar="PATH",
                   help="run `PATH freeze MOUNTPOINT` before the freeze and `PATH thaw "
                        "MOUNTPOINT` after the thaw")
    p.add_argument("--hook-timeout", type=_positive, default=30.0, metavar="S",
                   help="kill the hook after S seconds and give up (default 30)")
    p.add_argument("--resync", action="store_true",
                   help="a pair left split (by the previous prepare) is resynced first, "
                        "releasing its split image, instead of refused (pair-state)")
    p.add_argument("--no-expedite", dest="expedite", action="store_false",
                   help=EXPEDITE_HELP)
    p.set_defaults(run=_prepare)

    p = commands.add_parser(
        "thaw-all", parents=[common], help="thaw what a dead agent left frozen",
        description="Thaw every filesystem the freeze journal says is frozen and whose "
                    "watchdog is gone, and put /sys/kernel/rcu_expedited back to 0 if a dead "
                    "agent left it set (for the unit's ExecStopPost=). --json: {\"thawed\": "
                    "[...]}, with \"rcu\": WHAT_WAS_DONE when there was such a knob.")
    p.add_argument("--force", action="store_true",
                   help="also those whose watchdog still runs (a prepare in progress)")
    p.set_defaults(run=_thaw_all)


class _LocalCommands:
    add_commands = staticmethod(_add_local_commands)


# One line per module of commands (hostsvc: serve, token).
COMMAND_MODULES: list[Any] = [_LocalCommands, service, tokens_cmd]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", metavar="DIR", default=argparse.SUPPRESS,
                        help=f"records, FUSE mounts and the freeze journal (default "
                             f"${ENV_STATE_DIR}, else {DEFAULT_STATE_DIR})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the result (or the error) as JSON")
    parser = argparse.ArgumentParser(
        prog=PROG, parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The splitd agent on an application host: attaches splitd volumes as\n"
                    "block devices and prepares consistent split-mirror images of the\n"
                    "filesystems on them (freeze, split, thaw).",
        epilog="exit status: 0 done, 1 refused or failed, 2 bad command line, 4 the daemon\n"
               "could not be reached.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(commands, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.state_dir = getattr(args, "state_dir", None) or default_state_dir()
    args.json = getattr(args, "json", False)
    if os.geteuid() != 0 and args.command != "list":
        print(f"{PROG}: warning: not root; attach, freeze and thaw need root",
              file=sys.stderr)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except (OSError, WatchdogError) as e:
        # The state directory cannot be written, the watchdog cannot start.
        what = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return fail(args, "failed", f"{what}{reason}")


if __name__ == "__main__":
    sys.exit(main())
