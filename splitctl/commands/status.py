"""splitctl status: what the daemon is doing; --connections: each NBD
connection with its read counters."""
from __future__ import annotations

import time
from argparse import Namespace
from typing import Any

from splitctl.args import Commands
from splitctl.client import AdminClient
from splitctl.output import format_duration, format_size, listener_text, print_table


def run_status(client: AdminClient, args: Namespace) -> Any:
    if args.connections:
        return client.call("connections")
    return client.call("status")


def show_status(result: dict[str, Any], args: Namespace) -> None:
    if args.connections:
        show_connections(result)
        return
    version = result.get("version", "?")
    print(f"splitd {version}, pid {result.get('pid', '?')}, "
          f"up {format_duration(result.get('uptime_s', 0))}")
    if "data_dir" in result:
        print(f"data dir:    {result['data_dir']}")
    listeners = result.get("listeners") or []
    print(f"listeners:   {len(listeners)}")
    for listener in listeners:
        print(f"  {listener_text(listener)}")
    print(f"volumes:     {result.get('volumes', 0)}")
    for name, reason in sorted((result.get("unavailable_volumes") or {}).items()):
        print(f"  unavailable: {name}: {reason}")
    conns = result.get("connections") or []
    print(f"connections: {len(conns)}")
    if conns:
        rows = [[c.get("export", ""), c.get("peer", ""), c.get("listener", ""), _age(c)]
                for c in conns]
        print_table(["EXPORT", "PEER", "LISTENER", "FOR"], rows, indent=2)


def show_connections(result: dict[str, Any]) -> None:
    def rows(conns: list[dict[str, Any]], when: str) -> list[list[object]]:
        return [[c["id"], c["export"], c["peer"], c["listener"], _age(c, when),
                 c["read_requests"], c["read_bytes"], format_size(c["read_bytes"])]
                for c in conns]

    heads = ["ID", "EXPORT", "PEER", "PORT", "FOR", "READS", "BYTES READ", ""]
    print_table(heads, rows(result["connections"], "since"), right={0, 5, 6, 7},
                empty="no NBD connections")
    closed = result.get("closed") or []
    if closed:
        print(f"closed lately ({len(closed)}, the last one last):")
        print_table([*heads[:4], "CLOSED", *heads[5:]], rows(closed, "closed"),
                    right={0, 5, 6, 7}, indent=2)


def _age(conn: dict[str, Any], when: str = "since") -> str:
    """How long ago `when` (since: opened; closed) was: "2m 5s"."""
    return format_duration(time.time() - conn[when]) if when in conn else ""


def add_commands(commands: Commands) -> None:
    sub = commands.command(
        "status", run_status, show_status,
        help="show the daemon's version, listeners, volumes and connections",
        description="Show what splitd is doing: its version and uptime, the ports\n"
                    "it listens on, how many volumes it serves, and every open NBD\n"
                    "connection (export, peer address, listener, age).\n\n"
                    "With --connections, only the NBD connections, one line each: its\n"
                    "number (ID, from 1, never reused while the daemon runs), the\n"
                    "export, the peer (address:port, or the process on a Unix socket),\n"
                    "the port it came in by, its age, and its read counters: READS\n"
                    "(READ requests) and BYTES READ (the bytes they asked for, however\n"
                    "they were served), counted since the export was opened. Then the\n"
                    "last 64 connections to close, with their final counts (CLOSED:\n"
                    "how long ago). With --json: {\"connections\": [{id, export, peer,\n"
                    "listener, since, read_requests, read_bytes}], \"closed\": [the\n"
                    "same and closed]}, times in seconds since the epoch.",
        examples="  splitctl status\n  splitctl status --json\n"
                 "  splitctl status --connections\n  splitctl status --connections --json")
    sub.add_argument("--connections", action="store_true",
                     help="list the NBD connections with their read counters")
