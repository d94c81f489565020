"""splitctl: the admin command line, a thin shell over splitctl.client.

Each command is two small functions: `run` makes the admin call(s) and returns
the result, `show` prints it for people. `--json` prints the result as it is
instead, so scripts see exactly what the admin API returned.

Exit status: 0 done, 1 the daemon refused (or the connection broke while
waiting for its answer), 2 the command line itself is wrong (checked here,
before anything is sent), 3 `pair wait` timed out, 4 the daemon could not be
reached at all (nothing was sent).

A command may also have a `check(args)` that looks at its arguments together
(a volume paired with itself) and raises BadInput: exit 2, like argparse.

With --json every failure is one JSON object on stdout too,
{"error": {"code": ..., "message": ...}}: the daemon's code ("not-found",
"conflict", "bad-input", ...), "bad-input" for a wrong command line,
"unreachable" when there was no daemon to ask. `pair wait` prints its last
pair.show whatever the outcome, so there the "error" member is added to it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

from controller.states import READ_POLICIES
from splitctl.client import (DEFAULT_SOCKET, ENV_SOCKET, WAIT_TARGETS, AdminClient, AdminError,
                             WaitTimeout)
from volumes.errors import BadInput
from volumes.names import (DEFAULT_REGION_SIZE, format_size, parse_rate, parse_region_size,
                           parse_size, validate_name)

PROG = "splitctl"

EXIT_REFUSED, EXIT_USAGE, EXIT_TIMEOUT, EXIT_UNREACHABLE = 1, 2, 3, 4

EXIT_STATUS = f"""\
exit status:
  0  success
  1  splitd refused the request, or stopped answering (the reason is printed)
  2  the command line is wrong (nothing was sent)
  3  pair wait: the pair did not get there before --timeout
  4  splitd could not be reached (no socket, not a socket, connection
     refused, permission denied)

With --json, a failure prints {{"error": {{"code": ..., "message": ...}}}} on
stdout as well as the message on stderr.

environment:
  {ENV_SOCKET}  admin socket to use when --socket is not given
                       (default {DEFAULT_SOCKET})
"""


class UsageError(Exception):
    """The command line is wrong: `message`, and the command whose --help says
    how to get it right (`prog`). main() prints it and exits 2."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a UsageError (printed as one line by
    main), and an option the command does not have is named as such, with a
    pointer to that command's --help.

    argparse sets an unknown option aside and goes on, so `volume create -x 1M`
    would fail on a missing SIZE, and one after a complete command would be
    reported by the top-level parser, pointing to `splitctl --help`.
    """

    _seen: tuple[str, ...] = ()     # the arguments this parser was given

    def error(self, message: str):
        unknown = self._unknown_option(self._seen)
        if unknown is not None:
            message = f"unrecognized option {unknown}"
        raise UsageError(self.prog, message)

    def parse_known_args(self, args=None, namespace=None):
        self._seen = tuple(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            # Extras are refused here, by the innermost parser that has them;
            # the command's own parser (set_defaults) is the one to point to.
            parser = getattr(namespace, "parser", None) or self
            option = next((a for a in extras if self._looks_like_option(a)), None)
            message = (f"unrecognized option {option}" if option is not None
                       else f"unrecognized arguments: {' '.join(extras)}")
            raise UsageError(parser.prog, message)
        return namespace, extras

    def _looks_like_option(self, arg: str) -> bool:
        # As argparse sees it: "-5" and "-1.5" are values (no option of ours
        # looks like a negative number), so is "-" and anything with a space.
        return (len(arg) > 1 and arg[0] in self.prefix_chars and " " not in arg
                and not self._negative_number_matcher.match(arg))

    def _unknown_option(self, args) -> str | None:
        """The first argument of `args` that looks like an option this parser
        does not have (`--so` abbreviates `--socket`; `-xVALUE` is `-x`). A
        parser with subcommands looks only as far as its first argument that
        is not an option or an option's value: what follows is a command's."""
        options = self._option_string_actions
        skip = False
        for arg in args:
            if skip:        # the value of the option before
                skip = False
                continue
            if arg == "--":
                break
            if arg in options:
                skip = options[arg].nargs is None
                continue
            if not self._looks_like_option(arg):
                if self._subparsers is not None:
                    break
                continue
            if arg.startswith("--"):
                name = arg.split("=", 1)[0]
                known = name in options or (self.allow_abbrev and any(
                    o.startswith(name) for o in options))
            else:
                known = arg[:2] in options
            if not known:
                return arg
        return None


# -- argument types: the same checks as the daemon's, before anything is sent --

def _checked(check: Callable, what: str) -> Callable[[str], object]:
    def convert(text: str):
        try:
            return check(text)
        except BadInput as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = what  # argparse names the type in some messages
    return convert


def _check_socket_path(text: str) -> str:
    # Not "use the default": `--socket "$SOCK"` with SOCK unset is a mistake.
    if not text:
        raise BadInput("the admin socket path is empty")
    return text


_socket_path = _checked(_check_socket_path, "socket path")
_name = _checked(validate_name, "volume name")
_size = _checked(parse_size, "size")
_region_size = _checked(parse_region_size, "region size")
_rate = _checked(parse_rate, "rate")

_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_duration(text: str, what: str = "duration", positive: bool = False) -> float:
    """Seconds from "30", "2.5", "90s", "10m" or "1h"; more than 0 if `positive`."""
    body = text.strip().lower()
    unit = body[-1:] if body[-1:] in ("s", "m", "h") else ""
    try:
        value = float(body[:len(body) - len(unit)])
    except ValueError:
        raise BadInput(f"invalid {what} {text!r}: use seconds (30, 2.5) or a number with "
                       "s, m or h (90s, 10m, 1h)") from None
    low_ok = value > 0 if positive else value >= 0     # both refuse nan
    if not low_ok or value == float("inf"):
        least = "more than 0" if positive else "0 or more"
        raise BadInput(f"{what} must be {least} seconds, not {text!r}")
    return value * _DURATION_UNITS[unit]


_timeout = _checked(lambda text: parse_duration(text, "timeout"), "timeout")
_interval = _checked(lambda text: parse_duration(text, "interval", positive=True), "interval")


# -- commands --------------------------------------------------------------

def run_status(client: AdminClient, args) -> dict:
    return client.call("status")


def show_status(result: dict, args) -> None:
    version = result.get("version", "?")
    print(f"splitd {version}, pid {result.get('pid', '?')}, "
          f"up {format_duration(result.get('uptime_s', 0))}")
    if "data_dir" in result:
        print(f"data dir:    {result['data_dir']}")
    listeners = result.get("listeners") or []
    print(f"listeners:   {len(listeners)}")
    for listener in listeners:
        print(f"  {_listener_text(listener)}")
    print(f"volumes:     {result.get('volumes', 0)}")
    for name, reason in sorted((result.get("unavailable_volumes") or {}).items()):
        print(f"  unavailable: {name}: {reason}")
    conns = result.get("connections") or []
    print(f"connections: {len(conns)}")
    if conns:
        rows = [[c.get("export", ""), c.get("peer", ""), c.get("listener", ""),
                 format_duration(time.time() - c["since"]) if "since" in c else ""]
                for c in conns]
        print_table(["EXPORT", "PEER", "LISTENER", "FOR"], rows, indent=2)


def run_volume_create(client: AdminClient, args) -> dict:
    return client.call("volume.create", name=args.name, size=args.size,
                       region_size=args.region_size, read_only=args.read_only)


def show_volume_create(result: dict, args) -> None:
    extra = ", read-only" if result["read_only"] else ""
    print(f"created volume {result['name']}: {format_size(result['size'])}, "
          f"region size {format_size(result['region_size'])}{extra}")


def run_volume_list(client: AdminClient, args) -> dict:
    return client.call("volume.list")


def show_volume_list(result: dict, args) -> None:
    volumes = result["volumes"]
    if not volumes:
        print("no volumes")
        return
    rows = [[v["name"], format_size(v["size"]), format_size(v["allocated"]),
             format_size(v["region_size"]), "ro" if v["read_only"] else "rw",
             str(v["connections"])] for v in volumes]
    print_table(["NAME", "SIZE", "ALLOCATED", "REGION", "MODE", "CONNS"], rows,
                right={1, 2, 3, 5})


def run_volume_show(client: AdminClient, args) -> dict:
    return client.call("volume.show", name=args.name)


def show_volume_show(result: dict, args) -> None:
    fields = [
        ("name", result["name"]),
        ("size", f"{format_size(result['size'])} ({result['size']} bytes)"),
        ("allocated", f"{format_size(result['allocated'])} ({result['allocated']} bytes)"),
        ("region size", format_size(result["region_size"])),
        ("read-only", "yes" if result["read_only"] else "no"),
        ("connections", str(result["connections"])),
        ("path", result["path"]),
    ]
    width = max(len(k) for k, _ in fields) + 1
    for key, value in fields:
        print(f"{key + ':':<{width}} {value}")


def run_volume_resize(client: AdminClient, args) -> dict:
    return client.call("volume.resize", name=args.name, size=args.size)


def show_volume_resize(result: dict, args) -> None:
    print(f"volume {result['name']} is now {format_size(result['size'])}"
          " (clients see the new size when they reconnect)")


def run_volume_delete(client: AdminClient, args) -> dict:
    return client.call("volume.delete", name=args.name, force=args.force)


def show_volume_delete(result: dict, args) -> None:
    closed = result.get("connections_closed", 0)
    extra = f", closed {closed} connection{'s' if closed != 1 else ''}" if closed else ""
    print(f"deleted volume {result['name']}{extra}")


# -- pairs -------------------------------------------------------------------

def check_pair_create(args) -> None:
    if args.primary == args.secondary:
        raise BadInput(f"cannot pair volume {args.primary!r} with itself")


def run_pair_create(client: AdminClient, args) -> dict:
    return client.call("pair.create", primary=args.primary, secondary=args.secondary,
                       create_secondary=args.create_secondary, read_policy=args.read_policy,
                       rate=args.rate, group=args.group)


def show_pair_create(result: dict, args) -> None:
    extra = f", group {result['group']}" if result.get("group") else ""
    print(f"created pair {result['name']}: {result['primary']} -> {result['secondary']}, "
          f"state {result['state']}, {result['remaining']} of {result['regions']} regions to "
          f"copy (read policy {result['read_policy']}, rate {rate_text(result['rate'])}{extra})")


def run_pair_list(client: AdminClient, args) -> dict:
    return client.call("pair.list")


def show_pair_list(result: dict, args) -> None:
    pairs = result["pairs"]
    if not pairs:
        print("no pairs")
        return
    rows = [[p["name"], p["primary"], p["secondary"], p["state"],
             regions_text(p["remaining"], p["region_size"], short=True),
             rate_text(p["rate"]), p.get("group") or "-"] for p in pairs]
    print_table(["NAME", "PRIMARY", "SECONDARY", "STATE", "REMAINING", "RATE", "GROUP"], rows,
                right={4})


def run_pair_show(client: AdminClient, args) -> dict:
    return client.call("pair.show", name=args.name)


def show_pair_show(result: dict, args) -> None:
    p = result
    rs = p["region_size"]
    state = p["state"] + (f" ({p['reason']})" if p.get("reason") else "")
    fields = [
        ("pair", f"{p['name']} ({p['primary']} -> {p['secondary']})"),
        ("state", state),
        ("group", p.get("group") or "-"),
        ("read policy", p["read_policy"]),
        ("rate limit", rate_text(p["rate"])),
        ("regions", f"{p['regions']} of {format_size(rs)}"),
        ("remaining", regions_text(p["remaining"], rs)),
    ]
    if p["state"] == "split":
        fields += [
            ("pending", regions_text(p["pending"], rs) + " (not yet on the secondary)"),
            ("changed", f"{p['changed_p']} regions on the primary, {p['changed_s']} on the "
                        "secondary since the split"),
        ]
    if p["state"] == "restore":
        fields.append(("to restore", regions_text(p["to_restore"], rs)))
    copying = p["remaining"] > 0
    fields += [
        ("delta", regions_text(p["delta"], rs) + " changed since the previous split"),
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
    if p.get("split_at"):
        fields.append(("split at", time_text(p["split_at"])))
    if p.get("created"):
        fields.append(("created", time_text(p["created"])))
    width = max(len(k) for k, _ in fields) + 1
    for key, value in fields:
        print(f"{key + ':':<{width}} {value}")


def run_pair_split(client: AdminClient, args) -> dict:
    return client.call("pair.split", name=args.name)


def show_pair_split(result: dict, args) -> None:
    left = result["remaining"]
    rest = (f"{regions_text(left, result['region_size'])} still to copy in the background "
            f"(splitctl pair wait {result['name']} --until copied)" if left
            else "nothing left to copy")
    print(f"split pair {result['name']}: {result['secondary']} is now {result['primary']}'s "
          f"image at the split; {rest}")


def run_pair_resync(client: AdminClient, args) -> dict:
    return client.call("pair.resync", name=args.name)


def show_pair_resync(result: dict, args) -> None:
    todo = regions_text(result["remaining"], result["region_size"])
    print(f"resyncing pair {result['name']}: {todo} to copy "
          f"{result['primary']} -> {result['secondary']} "
          f"(splitctl pair wait {result['name']} --until synced)")


def run_pair_restore(client: AdminClient, args) -> dict:
    return client.call("pair.restore", name=args.name)


def show_pair_restore(result: dict, args) -> None:
    todo = regions_text(result["remaining"], result["region_size"])
    print(f"restoring pair {result['name']}: {todo} to copy "
          f"{result['secondary']} -> {result['primary']} "
          f"(splitctl pair wait {result['name']} --until synced)")


def run_pair_delete(client: AdminClient, args) -> dict:
    return client.call("pair.delete", name=args.name, force=args.force)


def show_pair_delete(result: dict, args) -> None:
    print(f"deleted pair {result['name']} (was {result.get('state_was', '?')}); "
          "both volumes are kept")


def check_pair_set(args) -> None:
    if args.rate is None and args.read_policy is None:
        raise BadInput("nothing to set: give --rate, --read-policy or both")


def run_pair_set(client: AdminClient, args) -> dict:
    params = {"name": args.name}
    if args.rate is not None:
        params["rate"] = args.rate
    if args.read_policy is not None:
        params["read_policy"] = args.read_policy
    return client.call("pair.set", **params)


def show_pair_set(result: dict, args) -> None:
    print(f"pair {result['name']}: rate {rate_text(result['rate'])}, "
          f"read policy {result['read_policy']}")


# Without a terminal, `pair wait` prints a progress line this often (seconds).
QUIET_REPORT_EVERY = 10.0


class WaitDisplay:
    """Progress of `pair wait` on stderr: a bar redrawn in place on a
    terminal, else a plain line every QUIET_REPORT_EVERY seconds."""

    def __init__(self, stream, until: str):
        self.stream = stream
        self.until = until
        self.tty = stream.isatty()
        self.drawn = False
        self.last_report = time.monotonic()
        self.last_total = 0

    def update(self, pair: dict) -> None:
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
        elif time.monotonic() - self.last_report >= QUIET_REPORT_EVERY:
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


def run_pair_wait(client: AdminClient, args) -> dict:
    display = WaitDisplay(sys.stderr, args.until)
    try:
        return client.wait_pair(args.name, args.until, timeout=args.timeout,
                                interval=args.interval, on_poll=display.update)
    finally:
        display.close()


def show_pair_wait(result: dict, args) -> None:
    if args.until == "synced":
        print(f"pair {result['name']} is synced: {result['secondary']} mirrors "
              f"{result['primary']} (state pair)")
    else:
        print(f"pair {result['name']} is copied: nothing left to copy "
              f"(state {result['state']})")


def run_group_split(client: AdminClient, args) -> dict:
    return client.call("group.split", name=args.name)


def show_group_split(result: dict, args) -> None:
    pairs = result["pairs"]
    print(f"split group {result['group']}: {len(pairs)} pair{'s' if len(pairs) != 1 else ''} "
          "at one single point")
    rows = [[p["name"], p["primary"], p["secondary"],
             regions_text(p["remaining"], p["region_size"], short=True)] for p in pairs]
    print_table(["NAME", "PRIMARY", "SECONDARY", "TO COPY"], rows, right={3}, indent=2)


def run_group_list(client: AdminClient, args) -> dict:
    return client.call("group.list")


def show_group_list(result: dict, args) -> None:
    groups = result["groups"]
    if not groups:
        print("no groups")
        return
    print_table(["GROUP", "PAIRS"], [[g["name"], ", ".join(g["pairs"])] for g in groups])


# -- output helpers --------------------------------------------------------

def print_table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset(),
                indent: int = 0) -> None:
    """Columns padded to their widest cell; columns in `right` aligned right."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        print(" " * indent + "  ".join(cells).rstrip())


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def rate_text(rate: int) -> str:
    return "unlimited" if not rate else f"{format_size(rate)}/s"


def regions_text(n: int, region_size: int, short: bool = False) -> str:
    # Bytes are at most n whole regions: the volume's last region may be shorter.
    if short:
        return "0" if n == 0 else f"{n} ({format_size(n * region_size)})"
    return f"{n} region{'s' if n != 1 else ''} ({format_size(n * region_size)})"


def percent(pair: dict) -> float:
    done, total = pair["progress"]["done"], pair["progress"]["total"]
    return 100.0 if total <= 0 else min(100.0, 100.0 * done / total)


def progress_text(pair: dict) -> str:
    prog = pair["progress"]
    return f"{prog['done']}/{prog['total']} regions ({percent(pair):.1f}%)"


def eta_text(pair: dict) -> str:
    if pair["remaining"] == 0:
        return "-"
    eta = pair.get("eta_s")
    return "unknown" if eta is None else format_duration(eta)


def time_text(when: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    return f"{stamp} ({format_duration(time.time() - when)} ago)"


def terminal_width(stream) -> int:
    """Columns of the terminal `stream` is on ($COLUMNS first, as shutil does;
    80 when unknown). shutil.get_terminal_size asks stdout, which may be a pipe."""
    try:
        columns = int(os.environ.get("COLUMNS", 0))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


def progress_bar(pair: dict, width: int) -> str:
    """One terminal line: name, state, [####....], regions, %, rate, ETA."""
    prog = pair["progress"]
    pct = percent(pair)
    head = f"{pair['name']} {pair['state']} "
    tail = (f" {prog['done']}/{prog['total']} regions {pct:5.1f}% "
            f"{format_size(pair['copy_rate'])}/s ETA {eta_text(pair)}")
    room = min(40, width - 1 - len(head) - len(tail) - 2)
    if room < 10:   # too narrow for a bar: the numbers alone, cut to fit
        return (head + tail.lstrip())[:max(width - 1, 1)]
    filled = int(room * pct / 100)
    return f"{head}[{'#' * filled}{'.' * (room - filled)}]{tail}"


def _listener_text(listener) -> str:
    # "backup=tcp://%eth1:10809 on 10.0.0.1:10809, TLS required": the name
    # only when it says more than the URI, the bound addresses only when
    # the URI did not already spell them out.
    if not isinstance(listener, dict):
        return str(listener)
    uri = str(listener.get("uri", ""))
    name = str(listener.get("name", ""))
    text = f"{name}={uri}" if name and uri and name != uri else (uri or name or str(listener))
    bound = [str(b) for b in listener.get("bound") or [] if str(b) not in uri]
    if bound:
        text += f" on {', '.join(bound)}"
    if listener.get("tls_required"):
        text += ", TLS required"
    return text


# -- the parser ------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    # --json and --socket work before or after the command: the copies on the
    # subcommands default to SUPPRESS so they never overwrite the global one.
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the daemon's reply as JSON instead of text")
    common.add_argument("--socket", metavar="PATH", type=_socket_path,
                        default=argparse.SUPPRESS,
                        help="admin socket of splitd (see below for the default)")

    parser = _Parser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Manage a splitd daemon: its volumes, their split-mirror pairs,\n"
                    "and what it is serving.\n\n"
                    "splitctl sends each command as one JSON request to splitd's admin\n"
                    "socket and prints the reply. Sizes accept plain bytes or a K, M, G,\n"
                    "T, P or E suffix (binary: 1K = 1024; 'G', 'GB' and 'GiB' all mean\n"
                    "2^30).",
        epilog="examples:\n"
               "  splitctl status\n"
               "  splitctl volume create db 100G\n"
               "  splitctl volume list --json\n"
               "  splitctl --socket /run/splitd/admin.sock volume show db\n"
               "  splitctl pair create db db-snap --create-secondary\n"
               "  splitctl pair wait db-snap --until synced && splitctl pair split db-snap\n\n"
               "run 'splitctl COMMAND --help' for each command's options.\n\n" + EXIT_STATUS)
    parser.add_argument("--json", action="store_true", default=False,
                        help="print the daemon's reply as JSON instead of text")
    parser.add_argument("--socket", metavar="PATH", type=_socket_path, default=None,
                        help=f"admin socket of splitd (default: ${ENV_SOCKET}, "
                             f"else {DEFAULT_SOCKET})")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(group, name: str, run, show, help: str, description: str,
                examples: str, check=None) -> argparse.ArgumentParser:
        sub = group.add_parser(
            name, parents=[common], help=help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            description=description, epilog=f"examples:\n{examples}\n\n{EXIT_STATUS}")
        sub.set_defaults(run=run, show=show, check=check, parser=sub)
        return sub

    command(commands, "status", run_status, show_status,
            help="show the daemon's version, listeners, volumes and connections",
            description="Show what splitd is doing: its version and uptime, the ports\n"
                        "it listens on, how many volumes it serves, and every open NBD\n"
                        "connection (export, peer address, listener, age).",
            examples="  splitctl status\n  splitctl status --json")

    volume = commands.add_parser(
        "volume", parents=[common], help="create, list, show, resize and delete volumes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Volumes are the block devices splitd serves: each one is an NBD\n"
                    "export of the same name, backed by a sparse file in the daemon's\n"
                    "data directory.",
        epilog="examples:\n  splitctl volume create db 100G\n  splitctl volume list\n\n"
               + EXIT_STATUS)
    volumes = volume.add_subparsers(title="volume commands", metavar="COMMAND", required=True)

    name_help = ("volume name: 1 to 64 letters, digits, '.', '_' or '-', starting with a "
                 "letter or digit; it is also the NBD export name")

    sub = command(volumes, "create", run_volume_create, show_volume_create,
                  help="create a volume",
                  description="Create an empty volume. Its backing file is sparse: a new\n"
                              "volume uses no disk space until it is written.",
                  examples="  splitctl volume create db 100G\n"
                           "  splitctl volume create scratch 512M --region-size 1M\n"
                           "  splitctl volume create golden 20GiB --read-only")
    sub.add_argument("name", metavar="NAME", type=_name, help=name_help)
    sub.add_argument("size", metavar="SIZE", type=_size,
                     help="size in bytes or with a K/M/G/T/P/E suffix (e.g. 64K, 10G, "
                          "1TiB); a multiple of 4096, less than 8E. The daemon's file "
                          "system may allow less (ext4: less than 16T)")
    sub.add_argument("--region-size", metavar="SIZE", type=_region_size,
                     default=DEFAULT_REGION_SIZE,
                     help="granularity of the volume's change bitmaps: a power of two "
                          "from 4K to 64M (default 64K). Smaller regions copy less after "
                          "small writes but make bigger bitmaps; it cannot be changed later")
    sub.add_argument("--read-only", action="store_true",
                     help="serve the volume read-only (NBD writes are refused with EPERM)")

    command(volumes, "list", run_volume_list, show_volume_list,
            help="list every volume",
            description="List every volume with its size, the disk space it really\n"
                        "uses (ALLOCATED), its region size, whether it is read-only\n"
                        "(MODE ro) or not (rw), and how many NBD connections it has.",
            examples="  splitctl volume list\n  splitctl volume list --json")

    sub = command(volumes, "show", run_volume_show, show_volume_show,
                  help="show one volume in detail",
                  description="Show one volume: size, allocated space, region size,\n"
                              "read-only flag, open connections and backing file.",
                  examples="  splitctl volume show db")
    sub.add_argument("name", metavar="NAME", type=_name, help="the volume to show")

    sub = command(volumes, "resize", run_volume_resize, show_volume_resize,
                  help="grow a volume",
                  description="Grow a volume to SIZE. Volumes only grow: a smaller size\n"
                              "is refused. NBD clients connected now keep the old size\n"
                              "until they reconnect.",
                  examples="  splitctl volume resize db 200G")
    sub.add_argument("name", metavar="NAME", type=_name, help="the volume to grow")
    sub.add_argument("size", metavar="SIZE", type=_size,
                     help="the new size (bytes or with a K/M/G/T/P/E suffix), at least the "
                          "current one, a multiple of 4096 and less than 8E")

    sub = command(volumes, "delete", run_volume_delete, show_volume_delete,
                  help="delete a volume and its data",
                  description="Delete a volume and its backing file. This cannot be undone.\n"
                              "A volume with open NBD connections is refused unless --force\n"
                              "is given, which closes those connections first.",
                  examples="  splitctl volume delete scratch\n"
                           "  splitctl volume delete scratch --force")
    sub.add_argument("name", metavar="NAME", type=_name, help="the volume to delete")
    sub.add_argument("--force", action="store_true",
                     help="close the volume's NBD connections and delete it anyway")

    _add_pair_commands(commands, common, command)
    _add_group_commands(commands, common, command)
    return parser


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


def _add_pair_commands(commands, common, command) -> None:
    pair = commands.add_parser(
        "pair", parents=[common], help="pair volumes, split, resync, restore, wait",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A pair links a primary volume to a secondary volume of the same\n"
                    "size. While paired the secondary mirrors the primary; 'split' turns\n"
                    "it at once into a point-in-time image of the primary, served as its\n"
                    "own NBD export; 'resync' makes it a mirror again, 'restore' copies\n"
                    "it back onto the primary. A pair is named by its secondary volume.\n\n"
                    + PAIR_STATES,
        epilog="examples:\n"
               "  splitctl pair create db db-snap --create-secondary\n"
               "  splitctl pair wait db-snap --until synced\n"
               "  splitctl pair split db-snap\n"
               "  splitctl pair resync db-snap\n\n" + EXIT_STATUS)
    pairs = pair.add_subparsers(title="pair commands", metavar="COMMAND", required=True)
    pair_name_help = "the pair: the name of its secondary volume"

    sub = command(pairs, "create", run_pair_create, show_pair_create,
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
    sub.add_argument("primary", metavar="PRIMARY", type=_name, help="the volume to mirror")
    sub.add_argument("secondary", metavar="SECONDARY", type=_name,
                     help="the volume that receives the copy; also the pair's name")
    sub.add_argument("--create-secondary", action="store_true",
                     help="create SECONDARY with PRIMARY's size and region size "
                          "(refused if it exists)")
    sub.add_argument("--read-policy", metavar="POLICY", choices=READ_POLICIES,
                     default="copy-on-read", help=POLICY_HELP)
    sub.add_argument("--rate", metavar="BYTES_PER_S", type=_rate, default=0, help=RATE_HELP)
    sub.add_argument("--group", metavar="NAME", type=_name, default=None,
                     help="add the pair to this consistency group: 'splitctl group split "
                          "NAME' splits every pair of the group at one single point")

    command(pairs, "list", run_pair_list, show_pair_list,
            help="list every pair",
            description="List every pair: its name (the secondary volume), primary and\n"
                        "secondary volumes, state, the regions still to copy in that state\n"
                        "(REMAINING: count, and their size), the rate limit and the group.\n\n"
                        + PAIR_STATES,
            examples="  splitctl pair list\n  splitctl pair list --json")

    sub = command(pairs, "show", run_pair_show, show_pair_show,
                  help="show one pair in detail",
                  description="Show one pair: state (and the reason of an error), read policy,\n"
                              "rate limit, region counts (remaining, pending after a split,\n"
                              "changed on either side since the split, delta since the\n"
                              "previous split), progress of the current copy with its rate\n"
                              "and ETA, and how many copy-on-write, copy-on-read and staged\n"
                              "reads the pair did since the daemon started.",
                  examples="  splitctl pair show db-snap\n  splitctl pair show db-snap --json")
    sub.add_argument("name", metavar="PAIR", type=_name, help=pair_name_help)

    sub = command(pairs, "split", run_pair_split, show_pair_split,
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
    sub.add_argument("name", metavar="PAIR", type=_name, help=pair_name_help)

    sub = command(pairs, "resync", run_pair_resync, show_pair_resync,
                  help="re-pair a split pair: the secondary mirrors the primary again",
                  description="Resync the pair: the secondary stops being served, and every\n"
                              "region changed on either side since the split (and any still\n"
                              "pending) is copied primary -> secondary; then the state is\n"
                              "pair. From error, every region is copied again (full resync).\n"
                              "Writes made to the secondary since the split are lost.",
                  examples="  splitctl pair resync db-snap\n"
                           "  splitctl pair resync db-snap &&\n"
                           "      splitctl pair wait db-snap --until synced")
    sub.add_argument("name", metavar="PAIR", type=_name, help=pair_name_help)

    sub = command(pairs, "restore", run_pair_restore, show_pair_restore,
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
    sub.add_argument("name", metavar="PAIR", type=_name, help=pair_name_help)

    sub = command(pairs, "delete", run_pair_delete, show_pair_delete,
                  help="delete a pair (its volumes are kept)",
                  description="Delete the pair: the two volumes stay as they are, unpaired, and\n"
                              "the secondary's NBD connections are closed. Refused while split\n"
                              "with regions not yet copied (the secondary would be incomplete)\n"
                              "or while restoring (the primary would be half restored), unless\n"
                              "--force is given.",
                  examples="  splitctl pair delete db-snap\n  splitctl pair delete db-snap --force")
    sub.add_argument("name", metavar="PAIR", type=_name, help=pair_name_help)
    sub.add_argument("--force", action="store_true",
                     help="delete even if the secondary is incomplete or a restore is running")

    sub = command(pairs, "set", run_pair_set, show_pair_set,
                  help="change a pair's rate limit or read policy",
                  description="Change the copy rate limit or the read policy of a pair. Both\n"
                              "take effect at once, in any state.",
                  examples="  splitctl pair set db-snap --rate 50M\n"
                           "  splitctl pair set db-snap --rate 0 --read-policy wait",
                  check=check_pair_set)
    sub.add_argument("name", metavar="PAIR", type=_name, help=pair_name_help)
    sub.add_argument("--rate", metavar="BYTES_PER_S", type=_rate, default=None, help=RATE_HELP)
    sub.add_argument("--read-policy", metavar="POLICY", choices=READ_POLICIES, default=None,
                     help=POLICY_HELP)

    sub = command(pairs, "wait", run_pair_wait, show_pair_wait,
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
    sub.add_argument("name", metavar="PAIR", type=_name, help=pair_name_help)
    sub.add_argument("--until", required=True, choices=WAIT_TARGETS, metavar="TARGET",
                     help="what to wait for: synced or copied (see above)")
    sub.add_argument("--timeout", metavar="SECONDS", type=_timeout, default=None,
                     help="give up after this long (seconds, or with s/m/h: 90s, 10m) and "
                          "exit 3; default: wait as long as it takes")
    sub.add_argument("--interval", metavar="SECONDS", type=_interval, default=1.0,
                     help="time between two polls of the pair (default 1 second)")


def _add_group_commands(commands, common, command) -> None:
    group = commands.add_parser(
        "group", parents=[common], help="split consistency groups of pairs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A consistency group is a set of pairs that split together, at one\n"
                    "single point: no primary write of any of them lands between the\n"
                    "first pair's split and the last one's. Pairs join a group when they\n"
                    "are created (splitctl pair create --group NAME).",
        epilog="examples:\n  splitctl group list\n  splitctl group split prod\n\n"
               + EXIT_STATUS)
    groups = group.add_subparsers(title="group commands", metavar="COMMAND", required=True)

    sub = command(groups, "split", run_group_split, show_group_split,
                  help="split every pair of a group at one single point",
                  description="Split every pair of the group at once, at one single point\n"
                              "(see 'splitctl pair split --help' for what a split does). Refused\n"
                              "as a whole, with nothing split, if any pair of the group cannot\n"
                              "be split in its state.",
                  examples="  splitctl group split prod\n  splitctl group split prod --json")
    sub.add_argument("name", metavar="NAME", type=_name, help="the group to split")

    command(groups, "list", run_group_list, show_group_list,
            help="list groups and their pairs",
            description="List every consistency group with the pairs in it.",
            examples="  splitctl group list\n  splitctl group list --json")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    json_errors = _wants_json(argv)
    try:
        args = build_parser().parse_args(argv)
        if args.check is not None:
            try:
                args.check(args)
            except BadInput as e:
                args.parser.error(str(e))
    except UsageError as e:
        return _fail(EXIT_USAGE, "bad-input", e.message, json_errors,
                     line=f"{PROG}: error: {e.message} (see '{e.prog} --help')")
    try:
        with AdminClient(args.socket) as client:
            result = args.run(client, args)
        if args.json:
            print(json.dumps(result, indent=2, sort_keys=True))
        else:
            args.show(result, args)
        sys.stdout.flush()
    except AdminError as e:
        status = (EXIT_TIMEOUT if isinstance(e, WaitTimeout)
                  else EXIT_UNREACHABLE if e.code == "unreachable" else EXIT_REFUSED)
        # pair wait: with --json the last pair.show is printed in every outcome.
        return _fail(status, e.code, e.message, args.json, base=getattr(e, "pair", None))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _stdout_gone()
        return 1
    return 0


def _wants_json(argv: list[str]) -> bool:
    """--json (or an abbreviation argparse would take) before any "--",
    looked for before parsing: a command line that does not parse is reported
    as JSON too."""
    for arg in argv:
        if arg == "--":
            break
        if len(arg) >= 3 and "--json".startswith(arg):
            return True
    return False


def _fail(status: int, code: str, message: str, as_json: bool, line: str | None = None,
          base: dict | None = None) -> int:
    """A failure: with --json, {"error": {"code", "message"}} on stdout (added
    to `base` when there is one); always one line on stderr. Returns `status`."""
    if as_json:
        try:
            print(json.dumps(dict(base or {}, error={"code": code, "message": message}),
                             indent=2, sort_keys=True))
            sys.stdout.flush()
        except BrokenPipeError:
            _stdout_gone()
    print(line or f"{PROG}: {message}", file=sys.stderr)
    return status


def _stdout_gone() -> None:
    # `splitctl volume list | head`: the reader left. Point stdout at
    # /dev/null so the flush at exit does not fail a second time.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("splitd")
    except Exception:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
