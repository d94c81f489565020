"""splitctl: the admin command line, a thin shell over splitctl.client.

Each command is two small functions: `run` makes the admin call(s) and returns
the result, `show` prints it for people. `--json` prints the result as it is
instead, so scripts see exactly what the admin API returned.

Exit status: 0 done, 1 the daemon refused or could not be reached, 2 the
command line itself is wrong (checked here, before anything is sent).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

from splitctl.client import DEFAULT_SOCKET, ENV_SOCKET, AdminClient, AdminError
from volumes.errors import BadInput
from volumes.names import (DEFAULT_REGION_SIZE, format_size, parse_region_size, parse_size,
                           validate_name)

PROG = "splitctl"

EXIT_STATUS = f"""\
exit status:
  0  success
  1  splitd refused the request (the reason is printed) or could not be reached
  2  the command line is wrong

environment:
  {ENV_SOCKET}  admin socket to use when --socket is not given
                       (default {DEFAULT_SOCKET})
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: `splitctl: error: ...`."""

    def error(self, message: str):
        hint = f" (see '{self.prog} --help')"
        self.exit(2, f"{PROG}: error: {message}{hint}\n")


# -- argument types: the same checks as the daemon's, before anything is sent --

def _checked(check: Callable, what: str) -> Callable[[str], object]:
    def convert(text: str):
        try:
            return check(text)
        except BadInput as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = what  # argparse names the type in some messages
    return convert


_name = _checked(validate_name, "volume name")
_size = _checked(parse_size, "size")
_region_size = _checked(parse_region_size, "region size")


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
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                        help="admin socket of splitd (see below for the default)")

    parser = _Parser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Manage a splitd daemon: its volumes, and what it is serving.\n\n"
                    "splitctl sends each command as one JSON request to splitd's admin\n"
                    "socket and prints the reply. Sizes accept plain bytes or K, M, G, T\n"
                    "suffixes (binary: 1K = 1024; 'G', 'GB' and 'GiB' all mean 2^30).",
        epilog="examples:\n"
               "  splitctl status\n"
               "  splitctl volume create db 100G\n"
               "  splitctl volume list --json\n"
               "  splitctl --socket /run/splitd/admin.sock volume show db\n\n"
               "run 'splitctl COMMAND --help' for each command's options.\n\n" + EXIT_STATUS)
    parser.add_argument("--json", action="store_true", default=False,
                        help="print the daemon's reply as JSON instead of text")
    parser.add_argument("--socket", metavar="PATH", default=None,
                        help=f"admin socket of splitd (default: ${ENV_SOCKET}, "
                             f"else {DEFAULT_SOCKET})")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(group, name: str, run, show, help: str, description: str,
                examples: str) -> argparse.ArgumentParser:
        sub = group.add_parser(
            name, parents=[common], help=help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            description=description, epilog=f"examples:\n{examples}\n\n{EXIT_STATUS}")
        sub.set_defaults(run=run, show=show)
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
                     help="size in bytes or with a K/M/G/T suffix (e.g. 64K, 10G, 1TiB); "
                          "a multiple of 4096")
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
                     help="the new size (bytes or with a K/M/G/T suffix), at least the "
                          "current one and a multiple of 4096")

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with AdminClient(args.socket) as client:
            result = args.run(client, args)
        if args.json:
            print(json.dumps(result, indent=2, sort_keys=True))
        else:
            args.show(result, args)
        sys.stdout.flush()
    except AdminError as e:
        print(f"{PROG}: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `splitctl volume list | head`: the reader left. Point stdout at
        # /dev/null so the flush at exit does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("splitd")
    except Exception:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
