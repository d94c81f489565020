"""splitd-host token create | list | revoke: the bearer tokens of the agent's
TCP port (splitd-host serve --listen), kept in STATE_DIR/tokens.db. They work
whether the service runs or not; a running one sees a change at its next
authentication or request."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from agents.host.tokens import HOST_SCOPES, HostTokens, TokenDB, describe
from common.errors import SplitdError
from common.names import validate_name
from splitctl.output import print_table, time_text

SCOPE_HELP = """\
scopes:
  read     status, list, ping: changes nothing
  prepare  read, plus prepare of directories matching --dirs (a glob matched
           against the directory as asked for and as resolved; default all)
  admin    everything
"""


def _open(args: argparse.Namespace) -> HostTokens:
    return HostTokens(TokenDB(args.state_dir))


def _create(args: argparse.Namespace) -> int:
    from agents.host.cli import EXIT_USAGE, emit, fail

    tokens = _open(args)
    try:
        rec, secret = tokens.create(args.name, args.scope, args.dirs)
    except SplitdError as e:
        return fail(args, e.code, str(e), EXIT_USAGE if e.code == "bad-input" else 1)
    finally:
        tokens.db.close()
    if not args.json:
        limit = f", dirs {rec.dirs}" if rec.scope == "prepare" else ""
        print(f"created token {rec.name} (scope {rec.scope}{limit}); the secret below is "
              "shown only this once: keep it in a file for --token-file", file=sys.stderr)
    # The secret alone on stdout: `splitd-host token create ... > backup.token`.
    return emit(args, {**describe(rec), "token": secret}, secret)


def _list(args: argparse.Namespace) -> int:
    from agents.host.cli import emit

    tokens = _open(args)
    try:
        rows = [describe(rec) for rec in tokens.list()]
    finally:
        tokens.db.close()
    if args.json:
        return emit(args, {"tokens": rows}, "")
    print_table(["NAME", "SCOPE", "DIRS", "CREATED", "LAST USED"],
                [[r["name"], r["scope"], r["dirs"], time_text(r["created"]),
                  time_text(r["last_used"]) if r["last_used"] is not None else "never"]
                 for r in rows], empty="no tokens")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from agents.host.cli import emit, fail

    tokens = _open(args)
    try:
        rec = tokens.revoke(args.name)
    except SplitdError as e:
        return fail(args, e.code, str(e))
    finally:
        tokens.db.close()
    return emit(args, describe(rec), f"revoked token {rec.name}: connections using it are "
                                     "refused from their next request")


def _name(text: str) -> str:
    try:
        return validate_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("volume name", "token name")) from None


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    group = commands.add_parser(
        "token", help="bearer tokens for the agent's TCP port",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tokens let a remote client (splitctl backup prepare, the backup\n"
                    "agent) call the agent over TCP with TLS (splitd-host serve --listen).\n"
                    "Each has a scope; the secret is shown once, when it is made, and only\n"
                    "its SHA-256 is kept (STATE_DIR/tokens.db).\n\n" + SCOPE_HELP,
        epilog="examples:\n"
               "  splitd-host token create backup --scope prepare --dirs '/srv/*' > backup.token\n"
               "  splitd-host token list\n  splitd-host token revoke backup")
    sub = group.add_subparsers(dest="token_command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "create", parents=[common], help="make a token and print its secret (once)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make a token and print its secret on stdout, alone on its line: it\n"
                    "is never shown again. With --json: name, scope, dirs, created,\n"
                    "last_used and token (the secret).\n\n" + SCOPE_HELP,
        epilog="examples:\n"
               "  splitd-host token create monitor --scope read > monitor.token\n"
               "  splitd-host token create backup --scope prepare --dirs '/srv/db*'")
    p.add_argument("name", metavar="NAME", type=_name,
                   help="the token's name (1 to 64 letters, digits, '.', '_', '-')")
    p.add_argument("--scope", required=True, choices=[str(s) for s in HOST_SCOPES],
                   help="what the token may do (see below)")
    p.add_argument("--dirs", metavar="GLOB", default=None,
                   help="prepare tokens: the directories they may prepare, as a glob "
                        "('/srv/*'); default every directory")
    p.set_defaults(run=_create)

    p = sub.add_parser("list", parents=[common], help="list tokens (never their secrets)",
                       description="List every token: name, scope, dirs, when it was made and "
                                   "when a connection last authenticated with it.")
    p.set_defaults(run=_list)

    p = sub.add_parser("revoke", parents=[common], help="revoke a token",
                       description="Revoke a token: new connections with it are refused, and "
                                   "so is the next request of one already using it.")
    p.add_argument("name", metavar="NAME", type=_name, help="the token to revoke")
    p.set_defaults(run=_revoke)
