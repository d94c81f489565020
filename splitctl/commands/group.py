"""splitctl group split | list: consistency groups of pairs."""
from __future__ import annotations

from argparse import Namespace
from typing import Any

from splitctl import args as types
from splitctl.args import Commands
from splitctl.client import AdminClient
from splitctl.output import print_table, regions_text


def run_group_split(client: AdminClient, args: Namespace) -> Any:
    return client.call("group.split", name=args.name)


def show_group_split(result: dict[str, Any], args: Namespace) -> None:
    pairs = result["pairs"]
    print(f"split group {result['group']}: {len(pairs)} pair{'s' if len(pairs) != 1 else ''} "
          "at one single point")
    rows = [[p["name"], p["primary"], p["secondary"],
             regions_text(p["remaining"], p["region_size"], short=True), p["split_gen"],
             "-" if p["delta_base"] is None else p["delta_base"]] for p in pairs]
    print_table(["NAME", "PRIMARY", "SECONDARY", "TO COPY", "SPLIT GEN", "DELTA BASE"], rows,
                right={3, 4, 5}, indent=2)


def run_group_list(client: AdminClient, args: Namespace) -> Any:
    return client.call("group.list")


def show_group_list(result: dict[str, Any], args: Namespace) -> None:
    groups = result["groups"]
    print_table(["GROUP", "PAIRS"], [[g["name"], ", ".join(g["pairs"])] for g in groups], empty="no groups")


def add_commands(commands: Commands) -> None:
    groups = commands.group(
        "group", "group commands", help="split consistency groups of pairs",
        description="A consistency group is a set of pairs that split together, at one\n"
                    "single point: no primary write of any of them lands between the\n"
                    "first pair's split and the last one's. Pairs join a group when they\n"
                    "are created (splitctl pair create --group NAME).",
        examples="  splitctl group list\n  splitctl group split prod")

    sub = groups.command(
        "split", run_group_split, show_group_split,
        help="split every pair of a group at one single point",
        description="Split every pair of the group at once, at one single point\n"
                    "(see 'splitctl pair split --help' for what a split does). Refused\n"
                    "as a whole, with nothing split, if any pair of the group cannot\n"
                    "be split in its state.",
        examples="  splitctl group split prod\n  splitctl group split prod --json")
    sub.add_argument("name", metavar="NAME", type=types.name, help="the group to split")

    groups.command(
        "list", run_group_list, show_group_list,
        help="list groups and their pairs",
        description="List every consistency group with the pairs in it.",
        examples="  splitctl group list\n  splitctl group list --json")

