"""splitctl pair create | list | show | split | resync | restore | delete | set | wait."""
from __future__ import annotations

import sys
import time
from argparse import Namespace
from typing import Any, TextIO

from common.errors import BadInput
from common.states import READ_POLICIES, WAIT_TARGETS, PairState, ReadPolicy, WaitTarget
from splitctl import args as types
from splitctl.args import PROG, Commands
from splitctl.client import AdminClient
from splitctl.output import (
    eta_text,
    format_size,
    print_fields,
    print_table,
    progress_bar,
    progress_text,
    rate_text,
    regions_text,
    split_gen_text,
    terminal_width,
    time_text,
)


def check_pair_create(args: Namespace) -> None:
    if args.primary == args.secondary:
        raise BadInput(f"cannot pair volume {args.primary!r} with itself")


def run_pair_create(client: AdminClient, args: Namespace) -> Any:
    return client.call("pair.create", primary=args.primary, secondary=args.secondary,
                       create_secondary=args.create_secondary, read_policy=args.read_policy,
                       rate=args.rate, group=args.group)


def show_pair_create(result: dict[str, Any], args: Namespace) -> None:
    extra = f", group {result['group']}" if result.get("group") else ""
    print(f"created pair {result['name']}: {result['primary']} -> {result['secondary']}, "
          f"state {result['state']}, {result['remaining']} of {result['regions']} regions to "
          f"copy (read policy {result['read_policy']}, rate {rate_text(result['rate'])}{extra})")


def run_pair_list(client: AdminClient, args: Namespace) -> Any:
    return client.call("pair.list")


def show_pair_list(result: dict[str, Any], args: Namespace) -> None:
    pairs = result["pairs"]
    rows = [[p["name"], p["primary"], p["secondary"], p["state"],
             regions_text(p["remaining"], p["region_size"], short=True),
             rate_text(p["rate"]), p.get("group") or "-"] for p in pairs]
    print_table(["NAME", "PRIMARY", "SECONDARY", "STATE", "REMAINING", "RATE", "GROUP"], rows,
                right={4}, empty="no pairs")


def run_pair_show(client: AdminClient, args: Namespace) -> Any:
    return client.call("pair.show", name=args.name)


# pair.show's kind of an instant restore (controller/instant.py): a restore
# pair whose S is a backup snapshot; dissolved once the volume is restored.
INSTANT = "instant-restore"


def _instant_source(p: dict[str, Any]) -> str:
    src = p.get("source") or {}
    return f"instant restore from snapshot {src.get('snapshot')} of {src.get('store')}"


def show_pair_show(result: dict[str, Any], args: Namespace) -> None:
    p = result
    rs = p["region_size"]
    state = p["state"] + (f" ({p['reason']})" if p.get("reason") else "")
    instant = p.get("kind") == INSTANT
    fields = [
        ("pair", f"{p['name']} ({p['secondary']} -> {p['primary']})" if instant
         else f"{p['name']} ({p['primary']} -> {p['secondary']})"),
        ("state", state),
    ]
    if instant:
        # Not a pair of two volumes: no split, resync or delta; dissolved when done.
        fields.append(("kind", _instant_source(p) + " (dissolved when done: "
                       f"splitctl backup restore-status {p['name']} --wait)"))
        if (p.get("source") or {}).get("opening"):
            fields.append(("source", "its backup store is being opened: reads and writes of "
                                     "regions not yet restored wait for it"))
    fields += [
        ("group", p.get("group") or "-"),
        ("read policy", p["read_policy"]),
        ("rate limit", rate_text(p["rate"])),
        ("regions", f"{p['regions']} of {format_size(rs)}"),
        ("remaining", regions_text(p["remaining"], rs)),
    ]
    if p["state"] == PairState.SPLIT:
        fields += [
            ("pending", regions_text(p["pending"], rs) + " (not yet on the secondary)"),
            ("changed", (f"{p['changed_p']} regions on the primary, {p['changed_s']} on the "
                         "secondary since the split")),
        ]
    if p["state"] == PairState.RESTORE:
        fields.append(("to restore", regions_text(p["to_restore"], rs)))
    copying = p["remaining"] > 0
    if not instant:
        fields.append(("delta", regions_text(p["delta"], rs) + " changed since the previous split"))
    fields += [
        ("progress", progress_text(p) if p["progress"]["total"] else "nothing to copy"),
        # The daemon's rate is a moving average: once idle it only says how the
        # last copy went, so it is shown while there is something to copy.
        ("copy rate", f"{format_size(p['copy_rate'])}/s" if copying else "-"),
        ("ETA", eta_text(p)),
        ("copied", f"{p['copied_regions']} regions, {format_size(p['copied_bytes'])} of data"),
        ("copy-on-write", str(p["copy_on_write"])),
        ("copy-on-read", str(p["copy_on_read"])),
        ("staged reads", str(p["staged"])),
    ]
    if not instant:
        fields.append(("split gen", split_gen_text(p)))
    if p.get("split_at"):
        fields.append(("split at", time_text(p["split_at"])))
    if p.get("created"):
        fields.append(("created", time_text(p["created"])))
    print_fields(fields)


def run_pair_split(client: AdminClient, args: Namespace) -> Any:
    return client.call("pair.split", name=args.name)


def show_pair_split(result: dict[str, Any], args: Namespace) -> None:
    left = result["remaining"]
    rest = (f"{regions_text(left, result['region_size'])} still to copy in the background "
            f"(splitctl pair wait {result['name']} --until copied)" if left
            else "nothing left to copy")
    print(f"split pair {result['name']}: {result['secondary']} is now {result['primary']}'s "
          f"image at the split; {rest}; split gen {split_gen_text(result)}")


def run_pair_resync(client: AdminClient, args: Namespace) -> Any:
    return client.call("pair.resync", name=args.name)


def _show_copy_started(result: dict[str, Any], doing: str, source: str, target: str) -> None:
    todo = regions_text(result["remaining"], result["region_size"])
    print(f"{doing} pair {result['name']}: {todo} to copy {result[source]} -> {result[target]} "
          f"(splitctl pair wait {result['name']} --until synced)")


def show_pair_resync(result: dict[str, Any], args: Namespace) -> None:
    _show_copy_started(result, "resyncing", "primary", "secondary")


def run_pair_restore(client: AdminClient, args: Namespace) -> Any:
    return client.call("pair.restore", name=args.name)


def show_pair_restore(result: dict[str, Any], args: Namespace) -> None:
    _show_copy_started(result, "restoring", "secondary", "primary")


def run_pair_delete(client: AdminClient, args: Namespace) -> Any:
    return client.call("pair.delete", name=args.name, force=args.force)


def show_pair_delete(result: dict[str, Any], args: Namespace) -> None:
    print(f"deleted pair {result['name']} (was {result.get('state_was', '?')}); "
          "both volumes are kept")


def check_pair_set(args: Namespace) -> None:
    if args.rate is None and args.read_policy is None:
        raise BadInput("nothing to set: give --rate, --read-policy or both")


def run_pair_set(client: AdminClient, args: Namespace) -> Any:
    params: dict[str, Any] = {"name": args.name}
    if args.rate is not None:
        params["rate"] = args.rate
    if args.read_policy is not None:
        params["read_policy"] = args.read_policy
    return client.call("pair.set", **params)


def show_pair_set(result: dict[str, Any], args: Namespace) -> None:
    print(f"pair {result['name']}: rate {rate_text(result['rate'])}, "
          f"read policy {result['read_policy']}")


# Without a terminal, `pair wait` prints a progress line this often (seconds).
QUIET_REPORT_EVERY = 10.0


class WaitDisplay:
    """Progress of `pair wait` on stderr: a bar redrawn in place on a
    terminal, else a plain line every QUIET_REPORT_EVERY seconds."""

    def __init__(self, stream: TextIO, until: str):
        self.stream = stream
        self.until = until
        self.tty = stream.isatty()
        self.drawn = False
        self.last_report = time.monotonic()
        self.last_total = 0

    def update(self, pair: dict[str, Any]) -> None:
        # A finished drain resets the daemon's progress to 0/0 in the new state
        # (copy -> pair): show the drain that was waited for as complete instead.
        prog = pair["progress"]
        if prog["total"] == 0 and pair["remaining"] == 0 and self.last_total:
            pair = dict(pair, progress={"done": self.last_total, "total": self.last_total})
        elif prog["total"]:
            self.last_total = prog["total"]
        if self.tty:
            width = terminal_width(self.stream)
            self.stream.write("\r" + progress_bar(pair, width) + "\x1b[K")
            self.stream.flush()
            self.drawn = True
        elif pair.get("remaining") and time.monotonic() - self.last_report >= QUIET_REPORT_EVERY:
            # (Nothing remaining: the wait is over, its outcome line follows.)
            self.last_report = time.monotonic()
            self.stream.write(f"{PROG}: waiting for pair {pair['name']} to be {self.until}: "
                              f"{pair['state']}, {progress_text(pair)}, "
                              f"{format_size(pair['copy_rate'])}/s, ETA {eta_text(pair)}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")   # keep the last bar; messages go below it
            self.stream.flush()
            self.drawn = False


def run_pair_wait(client: AdminClient, args: Namespace) -> Any:
    display = WaitDisplay(sys.stderr, args.until)
    try:
        return client.wait_pair(args.name, args.until, timeout=args.timeout,
                                interval=args.interval, on_poll=display.update)
    finally:
        display.close()


def show_pair_wait(result: dict[str, Any], args: Namespace) -> None:
    if result.get("kind") == INSTANT:
        print(f"volume {result['name']} is restored: the {_instant_source(result)} is done; its "
              "pair is dissolved and the volume stands alone")
    elif args.until == WaitTarget.SYNCED:
        print(f"pair {result['name']} is synced: {result['secondary']} mirrors "
              f"{result['primary']} (state pair)")
    else:
        print(f"pair {result['name']} is copied: nothing left to copy "
              f"(state {result['state']})")


PAIR_STATES = """\
pair states:
  copy     initial copy primary -> secondary running; secondary not served
  pair     mirrored: primary writes are copied to the secondary; not served
  split    the secondary is the primary's image at the split, served read-write;
           regions not yet copied (pending) are copied in the background
  resync   regions changed since the split are copied primary -> secondary
  restore  regions changed since the split are copied secondary -> primary
  error    suspended by a fault (see the reason); only 'pair resync' leaves it
"""

POLICY_HELP = ("how reads of the split secondary are served while regions are still "
               "pending: copy-on-read (copy the region, then read it; the default), "
               "staging (read the primary into memory and serve that; the copy engine "
               "writes it to the secondary later), wait (hold the read until the copy "
               "engine has copied the region)")

RATE_HELP = ("copy rate limit of the pair in bytes/s, with an optional K/M/G/T/P/E "
             "suffix (binary: 100M = 100 MiB/s); 0 means unlimited")


def add_commands(commands: Commands) -> None:
    pairs = commands.group(
        "pair", "pair commands", help="pair volumes, split, resync, restore, wait",
        description="A pair links a primary volume to a secondary volume of the same\n"
                    "size. While paired the secondary mirrors the primary; 'split' turns\n"
                    "it at once into a point-in-time image of the primary, served as its\n"
                    "own NBD export; 'resync' makes it a mirror again, 'restore' copies\n"
                    "it back onto the primary. A pair is named by its secondary volume.\n\n"
                    + PAIR_STATES,
        examples="  splitctl pair create db db-snap --create-secondary\n"
                 "  splitctl pair wait db-snap --until synced\n"
                 "  splitctl pair split db-snap\n"
                 "  splitctl pair resync db-snap")
    pair_name_help = "the pair: the name of its secondary volume"

    sub = pairs.command(
        "create", run_pair_create, show_pair_create,
        help="pair a primary volume with a secondary",
        description="Pair PRIMARY with SECONDARY and start the initial copy (state\n"
                    "copy, then pair once it is done). The pair is named SECONDARY.\n\n"
                    "SECONDARY must exist with the same size as PRIMARY, and its\n"
                    "data is overwritten; or give --create-secondary to create it\n"
                    "(sparse, with PRIMARY's size and region size): then only the\n"
                    "allocated regions of PRIMARY are copied. A secondary cannot be\n"
                    "a primary or the secondary of another pair; a primary may have\n"
                    "several secondaries.",
        examples="  splitctl pair create db db-snap --create-secondary\n"
                 "  splitctl pair create db db-backup --rate 100M --read-policy staging\n"
                 "  splitctl pair create db db-snap --create-secondary --group prod\n"
                 "  splitctl pair create logs logs-snap --create-secondary --group prod",
        check=check_pair_create)
    sub.add_argument("primary", metavar="PRIMARY", type=types.name, help="the volume to mirror")
    sub.add_argument("secondary", metavar="SECONDARY", type=types.name,
                     help="the volume that receives the copy; also the pair's name")
    sub.add_argument("--create-secondary", action="store_true",
                     help="create SECONDARY with PRIMARY's size and region size "
                          "(refused if it exists)")
    sub.add_argument("--read-policy", metavar="POLICY", choices=READ_POLICIES,
                     default=ReadPolicy.COPY_ON_READ, help=POLICY_HELP)
    sub.add_argument("--rate", metavar="BYTES_PER_S", type=types.rate, default=0, help=RATE_HELP)
    sub.add_argument("--group", metavar="NAME", type=types.name, default=None,
                     help="add the pair to this consistency group: 'splitctl group split "
                          "NAME' splits every pair of the group at one single point")

    pairs.command(
        "list", run_pair_list, show_pair_list,
        help="list every pair",
        description="List every pair: its name (the secondary volume), primary and\n"
                    "secondary volumes, state, the regions still to copy in that state\n"
                    "(REMAINING: count, and their size), the rate limit and the group.\n\n"
                    + PAIR_STATES,
        examples="  splitctl pair list\n  splitctl pair list --json")

    sub = pairs.command(
        "show", run_pair_show, show_pair_show,
        help="show one pair in detail",
        description="Show one pair: state (and the reason of an error), read policy,\n"
                    "rate limit, region counts (remaining, pending after a split,\n"
                    "changed on either side since the split, delta since the\n"
                    "previous split), progress of the current copy with its rate\n"
                    "and ETA, and how many copy-on-write, copy-on-read and staged\n"
                    "reads the pair did since the daemon started.",
        examples="  splitctl pair show db-snap\n  splitctl pair show db-snap --json")
    sub.add_argument("name", metavar="PAIR", type=types.name, help=pair_name_help)

    sub = pairs.command(
        "split", run_pair_split, show_pair_split,
        help="split a pair: the secondary becomes a point-in-time image",
        description="Split the pair at once: from this moment the secondary shows the\n"
                    "primary's image as it was at the split, and is served read-write\n"
                    "as its own NBD export. Nothing is copied before the reply: regions\n"
                    "not yet copied (pending) are copied in the background, and reads\n"
                    "of them follow the pair's read policy. Use 'pair wait --until\n"
                    "copied' to wait until the secondary holds every region. Allowed\n"
                    "from copy, pair and resync.",
        examples="  splitctl pair split db-snap\n"
                 "  splitctl pair split db-snap &&\n"
                 "      splitctl pair wait db-snap --until copied")
    sub.add_argument("name", metavar="PAIR", type=types.name, help=pair_name_help)

    sub = pairs.command(
        "resync", run_pair_resync, show_pair_resync,
        help="re-pair a split pair: the secondary mirrors the primary again",
        description="Resync the pair: the secondary stops being served, and every\n"
                    "region changed on either side since the split (and any still\n"
                    "pending) is copied primary -> secondary; then the state is\n"
                    "pair. From error, every region is copied again (full resync).\n"
                    "Writes made to the secondary since the split are lost.",
        examples="  splitctl pair resync db-snap\n"
                 "  splitctl pair resync db-snap &&\n"
                 "      splitctl pair wait db-snap --until synced")
    sub.add_argument("name", metavar="PAIR", type=types.name, help=pair_name_help)

    sub = pairs.command(
        "restore", run_pair_restore, show_pair_restore,
        help="copy a split secondary back onto its primary",
        description="Restore the primary to the secondary's image: every region\n"
                    "changed on either side since the split is copied secondary ->\n"
                    "primary, then the pair mirrors again (state pair). The primary\n"
                    "stays usable meanwhile: reads of regions not yet restored are\n"
                    "served from the secondary. Writes made to the primary since the\n"
                    "split are lost. Allowed from split only.",
        examples="  splitctl pair restore db-snap\n"
                 "  splitctl pair restore db-snap &&\n"
                 "      splitctl pair wait db-snap --until synced")
    sub.add_argument("name", metavar="PAIR", type=types.name, help=pair_name_help)

    sub = pairs.command(
        "delete", run_pair_delete, show_pair_delete,
        help="delete a pair (its volumes are kept)",
        description="Delete the pair: the two volumes stay as they are, unpaired, and\n"
                    "the secondary's NBD connections are closed. Refused while split\n"
                    "with regions not yet copied (the secondary would be incomplete)\n"
                    "or while restoring (the primary would be half restored), unless\n"
                    "--force is given.",
        examples="  splitctl pair delete db-snap\n  splitctl pair delete db-snap --force")
    sub.add_argument("name", metavar="PAIR", type=types.name, help=pair_name_help)
    sub.add_argument("--force", action="store_true",
                     help="delete even if the secondary is incomplete or a restore is running")

    sub = pairs.command(
        "set", run_pair_set, show_pair_set,
        help="change a pair's rate limit or read policy",
        description="Change the copy rate limit or the read policy of a pair. Both\n"
                    "take effect at once, in any state.",
        examples="  splitctl pair set db-snap --rate 50M\n"
                 "  splitctl pair set db-snap --rate 0 --read-policy wait",
        check=check_pair_set)
    sub.add_argument("name", metavar="PAIR", type=types.name, help=pair_name_help)
    sub.add_argument("--rate", metavar="BYTES_PER_S", type=types.rate, default=None, help=RATE_HELP)
    sub.add_argument("--read-policy", metavar="POLICY", choices=READ_POLICIES, default=None,
                     help=POLICY_HELP)

    sub = pairs.command(
        "wait", run_pair_wait, show_pair_wait,
        help="wait until a pair is synced or copied",
        description="Wait until the pair gets somewhere, polling it every --interval:\n"
                    "  synced  the secondary mirrors the primary (state pair): the\n"
                    "          initial copy, a resync or a restore is done\n"
                    "  copied  nothing is left to copy and the state is split or pair:\n"
                    "          after a split, the secondary holds its whole image\n\n"
                    "On a terminal a progress bar is drawn on stderr (regions done /\n"
                    "total, percentage, copy rate, ETA). Otherwise a progress line is\n"
                    f"printed on stderr every {QUIET_REPORT_EVERY:g} seconds. If the "
                    "pair goes to state\n"
                    "error, the wait stops with its reason (exit 1). With --json, the\n"
                    "last 'pair show' is printed, whatever the outcome; when the wait\n"
                    "failed it also holds \"error\": {\"code\": ..., \"message\": ...}.",
        examples="  splitctl pair wait db-snap --until synced\n"
                 "  splitctl pair wait db-snap --until copied --timeout 10m\n"
                 "  splitctl pair wait db-snap --until synced --interval 5 --json")
    sub.add_argument("name", metavar="PAIR", type=types.name, help=pair_name_help)
    sub.add_argument("--until", required=True, choices=WAIT_TARGETS, metavar="TARGET",
                     help="what to wait for: synced or copied (see above)")
    sub.add_argument("--timeout", metavar="SECONDS", type=types.timeout, default=None,
                     help="give up after this long (seconds, or with s/m/h: 90s, 10m) and "
                          "exit 3; default: wait as long as it takes")
    sub.add_argument("--interval", metavar="SECONDS", type=types.interval, default=1.0,
                     help="time between two polls of the pair (default 1 second)")

