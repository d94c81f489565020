"""splitctl port list, and splitctl locate: the daemon's ports (named
listeners) and a secondary's NBD URI as reached through one of them."""
from __future__ import annotations

import re
from argparse import ArgumentTypeError, Namespace
from typing import Any

from common.names import NAME_PATTERN
from splitctl import args as types
from splitctl.args import Commands
from splitctl.client import AdminClient
from splitctl.output import print_fields, print_table, split_gen_text, time_text

PORTS = """\
ports:
  Every listener of splitd has a name: that name is a port. It is given with
  'splitd --listen NAME=URI' (or in the configuration file); a listener given
  without one is named after its kind: unix, unix-2, ..., tcp, tcp-2, ...
  The host agent asks for a secondary 'as reached through' a port, such as
  the one on the backup network."""

TLS_MODES = """\
TLS modes:
  off      plaintext only
  on       STARTTLS offered, plaintext accepted too
  require  TLS only (TCP ports under 'splitd --tls require')"""


def port_name(text: str) -> str:
    """Port names follow the volume name rules: a wrong one is a bad command line."""
    if not re.fullmatch(NAME_PATTERN, text):
        raise ArgumentTypeError(f"invalid port name {text!r}: use 1 to 64 letters, digits, "
                                "'.', '_' or '-', starting with a letter or digit")
    return text


def run_port_list(client: AdminClient, args: Namespace) -> Any:
    return client.call("port.list")


def show_port_list(result: dict[str, Any], args: Namespace) -> None:
    rows: list[list[str]] = []
    for port in result["ports"]:
        bound = port.get("bound") or ["-"]
        # An interface listener is bound to each of its addresses: one line each.
        rows.append([port["name"], port["uri"], port.get("tls", "off"), bound[0]])
        rows.extend(["", "", "", b] for b in bound[1:])
    print_table(["PORT", "URI", "TLS", "BOUND TO"], rows, empty="no ports")


def run_locate(client: AdminClient, args: Namespace) -> Any:
    if args.primary:
        return client.call("locate", name=args.name, port=args.port, role="primary")
    return client.call("locate", name=args.name, port=args.port)


def show_locate(result: dict[str, Any], args: Namespace) -> None:
    # The URI alone on the first line: `splitctl locate ... | head -n1` is it.
    print(result["uri"])
    primary = result.get("role") == "primary"
    fields = [("volume", f"{result['volume']} (the primary side)")] if primary else []
    if result.get("pair") is None:
        fields.append(("pair", "- (the volume is in no pair, or in several)"))
    else:
        state = result["state"]
        if state != "split" and not primary:
            state += " (its secondary is served only once the pair is split)"
        fields += [
            ("pair", f"{result['pair']} ({result['primary']} -> {result['secondary']})"),
            ("state", state),
            ("group", result.get("group") or "-"),
            ("split gen", split_gen_text(result)),
            ("generation", f"{result['generation']} (of the bitmap files)"),
            ("split at", time_text(result["split_at"]) if result.get("split_at") else "-"),
        ]
    fields.append(("port", f"{result['port']} (TLS {result['tls']})"))
    fields += [("also", uri) for uri in result["uris"][1:]]
    print_fields(fields)


def add_commands(commands: Commands) -> None:
    ports = commands.group(
        "port", "port commands", help="list the daemon's ports (named listeners)",
        description="The ports splitd listens on for NBD clients.\n\n" + PORTS,
        examples="  splitctl port list\n  splitctl port list --json")
    ports.command(
        "list", run_port_list, show_port_list,
        help="list ports: name, URI, TLS mode, bound addresses",
        description="List every port of the daemon: its name, its listen URI, its TLS\n"
                    "mode, and what it is bound to (a socket path, or addresses; a\n"
                    "port on a network interface, tcp://%IFACE:PORT, is bound to each\n"
                    "address of the interface, one line each).\n\n"
                    + PORTS + "\n\n" + TLS_MODES,
        examples="  splitctl port list\n  splitctl port list --json")

    sub = commands.command(
        "locate", run_locate, show_locate,
        help="print the NBD URI of a pair's secondary (or primary) through a port",
        description="Print the NBD URI by which a pair's secondary is reached through\n"
                    "one port of the daemon, then the pair, its group, state, split\n"
                    "generation and bitmap generation. The URI alone is the first line.\n\n"
                    "NAME is one of:\n"
                    "  a pair (pairs are named by their secondary volume): that pair;\n"
                    "  a primary volume in exactly one pair: that pair.\n"
                    "A primary of several pairs is refused (name the pair), and so are\n"
                    "a volume in no pair, an unknown name, and an unknown port (the\n"
                    "refusal names the known ones). The URI is given whatever the\n"
                    "pair's state, but the secondary is served only in state split.\n\n"
                    "With --primary, the URI of the primary side instead, the volume a\n"
                    "host attaches: NAME is a pair (its primary), or any volume that is\n"
                    "no pair's secondary (that volume, paired or not). Its pair is shown\n"
                    "when it has exactly one.\n\n"
                    "Generations:\n"
                    "  split gen   how many times the pair has been split (kept across\n"
                    "              restarts); a backup records the one it read\n"
                    "  delta base  the split gen whose split the delta (x-splitd:delta)\n"
                    "              covers the changes since; none after the first\n"
                    "              split, a full resync, an error or a restore. A backup\n"
                    "              of this split is an exact incremental of the backup\n"
                    "              of split gen N only when the delta base is N\n"
                    "  generation  the pair's bitmap files (changes at every resync and\n"
                    "              restore); not a split count\n\n"
                    "URIs:\n"
                    "  nbd+unix:///EXPORT?socket=PATH   a Unix socket port\n"
                    "  nbd://ADDR:PORT/EXPORT           a TCP port (IPv6 in brackets)\n"
                    "  nbds://ADDR:PORT/EXPORT          a TCP port that requires TLS\n"
                    "A port on a network interface has one URI per address: the first\n"
                    "is printed (link-local IPv6 last), every one is under 'also' and\n"
                    "in the JSON 'uris'. A port bound to a wildcard address\n"
                    "(tcp://0.0.0.0:PORT) has no one address to give and is refused.\n\n"
                    "With --json: uri, uris (every address), port, tls, role\n"
                    "(secondary or primary), volume (the export the URI names), pair,\n"
                    "primary, secondary, group, state, generation, split_gen, delta_base\n"
                    "(as 'splitctl pair show' gives them), split_at and created (seconds\n"
                    "since the epoch; a pair deleted and made again under the same name\n"
                    "counts its splits from 0 again, with a new created); the pair's\n"
                    "fields are null where --primary names a volume with no one pair.\n\n"
                    + PORTS,
        examples="  splitctl locate db-snap --port backup\n"
                 "  splitctl locate db --port backup --json\n"
                 "  nbdinfo \"$(splitctl locate db-snap --port unix | head -n1)\"\n"
                 "  splitctl locate db --port backup --primary")
    sub.add_argument("name", metavar="NAME", type=types.name,
                     help="a pair (its secondary volume), or a primary volume in one pair")
    sub.add_argument("--port", metavar="PORT", type=port_name, required=True,
                     help="the port to reach it through (splitctl port list)")
    sub.add_argument("--primary", action="store_true",
                     help="the URI of the primary volume (or of NAME itself, a volume in no "
                          "pair), not of the secondary")
