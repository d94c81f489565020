"""splitctl token create | list | revoke: bearer tokens of the remote admin API."""
from __future__ import annotations

import sys
from argparse import Namespace
from typing import Any

from common.scopes import SCOPES
from splitctl import args as types
from splitctl.args import Commands
from splitctl.client import AdminClient
from splitctl.output import print_table, time_text

SCOPE_HELP = """\
scopes:
  read    status, volume/pair/group list and show, locate: changes nothing
  split   read, plus pair split and group split of pairs whose volumes (both
          of them) match --volumes
  admin   everything, token management included

Tokens are managed over the admin socket, or remotely with an admin token.
"""


def run_token_create(client: AdminClient, args: Namespace) -> Any:
    return client.call("token.create", name=args.name, scope=args.scope, volumes=args.volumes)


def show_token_create(result: dict[str, Any], args: Namespace) -> None:
    # The secret alone on stdout (`splitctl token create ... > backup.token`);
    # what it is, on stderr.
    print(result["token"])
    limit = f", volumes {result['volumes']}" if result["scope"] == "split" else ""
    print(f"created token {result['name']} (scope {result['scope']}{limit}); the secret "
          "above is shown only this once: keep it in a file for --token-file", file=sys.stderr)


def run_token_list(client: AdminClient, args: Namespace) -> Any:
    return client.call("token.list")


def show_token_list(result: dict[str, Any], args: Namespace) -> None:
    rows = [[t["name"], t["scope"], t["volumes"], time_text(t["created"]),
             time_text(t["last_used"]) if t["last_used"] is not None else "never"]
            for t in result["tokens"]]
    print_table(["NAME", "SCOPE", "VOLUMES", "CREATED", "LAST USED"], rows, empty="no tokens")


def run_token_revoke(client: AdminClient, args: Namespace) -> Any:
    return client.call("token.revoke", name=args.name)


def show_token_revoke(result: dict[str, Any], args: Namespace) -> None:
    print(f"revoked token {result['name']}: connections using it are refused from now on")


def add_commands(commands: Commands) -> None:
    tokens = commands.group(
        "token", "token commands", help="bearer tokens for the remote admin API",
        description="Tokens let a remote client (splitctl --connect, the backup and\n"
                    "host agents) use the admin API over TCP with TLS (splitd\n"
                    "--admin-listen). Each has a scope; the secret is shown once,\n"
                    "when it is made, and only its hash is kept.\n\n" + SCOPE_HELP,
        examples="  splitctl token create backup --scope split --volumes 'db*' > backup.token\n"
                 "  splitctl token list\n  splitctl token revoke backup")

    sub = tokens.command(
        "create", run_token_create, show_token_create,
        help="make a token and print its secret (once)",
        description="Make a token and print its secret on stdout, alone on its line:\n"
                    "it is never shown again (only its SHA-256 is stored).\n\n" + SCOPE_HELP,
        examples="  splitctl token create monitor --scope read > monitor.token\n"
                 "  splitctl token create backup --scope split --volumes 'db*'\n"
                 "  splitctl token create ops --scope admin --json")
    sub.add_argument("name", metavar="NAME", type=types.name,
                     help="the token's name (the rules of volume names)")
    sub.add_argument("--scope", required=True, choices=[str(s) for s in SCOPES],
                     help="what the token may do (see below)")
    sub.add_argument("--volumes", metavar="GLOB", default=None,
                     help="split tokens: the volumes whose pairs it may split, as a glob "
                          "('db*'); default every volume")

    tokens.command(
        "list", run_token_list, show_token_list,
        help="list tokens (never their secrets)",
        description="List every token: name, scope, volumes, when it was made and\n"
                    "when a connection last authenticated with it.",
        examples="  splitctl token list\n  splitctl token list --json")

    sub = tokens.command(
        "revoke", run_token_revoke, show_token_revoke,
        help="revoke a token",
        description="Revoke a token: new connections with it are refused, and so is the\n"
                    "next request of a connection already using it.",
        examples="  splitctl token revoke backup")
    sub.add_argument("name", metavar="NAME", type=types.name, help="the token to revoke")
