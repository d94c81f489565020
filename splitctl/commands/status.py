"""splitctl status: what the daemon is doing."""
from __future__ import annotations

import time
from argparse import Namespace
from typing import Any

from splitctl.args import Commands
from splitctl.client import AdminClient
from splitctl.output import format_duration, listener_text, print_table


def run_status(client: AdminClient, args: Namespace) -> Any:
    return client.call("status")


def show_status(result: dict[str, Any], args: Namespace) -> None:
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
        rows = [[c.get("export", ""), c.get("peer", ""), c.get("listener", ""),
                 format_duration(time.time() - c["since"]) if "since" in c else ""]
                for c in conns]
        print_table(["EXPORT", "PEER", "LISTENER", "FOR"], rows, indent=2)


def add_commands(commands: Commands) -> None:
    commands.command(
        "status", run_status, show_status,
        help="show the daemon's version, listeners, volumes and connections",
        description="Show what splitd is doing: its version and uptime, the ports\n"
                    "it listens on, how many volumes it serves, and every open NBD\n"
                    "connection (export, peer address, listener, age).",
        examples="  splitctl status\n  splitctl status --json")
