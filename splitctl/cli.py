"""splitctl: the admin command line, a thin shell over splitctl.client.

This module holds main() and the top-level parser. The commands live in
splitctl/commands/ (one module per command group), the parser's rules and
argument types in splitctl/args.py, and everything printed in
splitctl/output.py.

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
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from common.errors import BadInput, ErrorCode
from splitctl.args import (
    EXIT_REFUSED,
    EXIT_STATUS,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    JSON_HELP,
    PROG,
    Commands,
    Parser,
    UsageError,
    add_remote_options,
    parse_duration,
    rate,
    socket_path,
)
from splitctl.client import (
    DEFAULT_SOCKET,
    ENV_CONNECT,
    ENV_SOCKET,
    ENV_TLS_CA,
    ENV_TOKEN_FILE,
    AdminClient,
    AdminError,
    RemoteAdminClient,
    WaitTimeout,
    parse_connect,
)
from splitctl.commands import backup, group, pair, port, status, token, volume
from splitctl.output import fail, print_json, stdout_gone

__all__ = ["build_parser", "main", "parse_duration"]

# The rate argument type under the name it had when it lived here (tests use it).
_rate = rate


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
               "  splitctl --connect tcp://storage:10810 --token-file backup.token \\\n"
               "           --tls-ca ca.pem pair split db-snap\n"
               "  splitctl pair create db db-snap --create-secondary\n"
               "  splitctl pair wait db-snap --until synced && splitctl pair split db-snap\n\n"
               "run 'splitctl COMMAND --help' for each command's options.\n\n" + EXIT_STATUS)
    parser.add_argument("--json", action="store_true", default=False, help=JSON_HELP)
    parser.add_argument("--socket", metavar="PATH", type=socket_path, default=None,
                        help=f"admin socket of splitd (default: ${ENV_SOCKET}, "
                             f"else {DEFAULT_SOCKET})")
    add_remote_options(parser, None)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = Commands(parser, "commands")
    for module in (status, volume, pair, group, port, token, backup):
        module.add_commands(commands)
    return parser


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
        return fail(EXIT_USAGE, ErrorCode.BAD_INPUT, e.message, json_errors,
                    line=f"{PROG}: error: {e.message} (see '{e.prog} --help')")
    try:
        client = args.client(args) if args.client is not None else _client(args)
    except BadInput as e:
        return fail(EXIT_USAGE, ErrorCode.BAD_INPUT, str(e), json_errors,
                    line=f"{PROG}: error: {e} (see '{PROG} --help')")
    try:
        with client:
            result = args.run(client, args)
        if args.json:
            print_json(result)
        else:
            args.show(result, args)
        sys.stdout.flush()
    except AdminError as e:
        exit_status = (EXIT_TIMEOUT if isinstance(e, WaitTimeout)
                       else EXIT_UNREACHABLE if e.code in (ErrorCode.UNREACHABLE, ErrorCode.TLS)
                       else EXIT_REFUSED)
        # pair wait: with --json the last pair.show is printed in every outcome.
        return fail(exit_status, e.code, e.message, args.json, base=getattr(e, "pair", None))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        stdout_gone()
        return 1
    return 0


def _client(args: argparse.Namespace) -> AdminClient:
    """The admin socket, or a remote daemon with --connect (or $SPLITD_CONNECT).
    BadInput (exit 2, nothing sent) for remote options that do not fit."""
    connect = args.connect or os.environ.get(ENV_CONNECT)
    if not connect:
        if args.token_file or args.tls_ca:
            raise BadInput("--token-file and --tls-ca go with --connect")
        return AdminClient(args.socket)
    if args.socket:
        raise BadInput("--socket and --connect: give one (the local socket or a remote daemon)")
    try:
        parse_connect(connect)
    except ValueError as e:
        raise BadInput(str(e)) from None
    token_file = args.token_file or os.environ.get(ENV_TOKEN_FILE)
    if not token_file:
        raise BadInput(f"--connect needs a token: --token-file FILE (or ${ENV_TOKEN_FILE})")
    try:
        with open(token_file) as f:
            secret = f.read(4096)
    except OSError as e:
        raise BadInput(f"cannot read the token file {token_file}: {e.strerror or e}") from None
    try:
        return RemoteAdminClient(connect, secret, args.tls_ca or os.environ.get(ENV_TLS_CA))
    except ValueError as e:
        raise BadInput(str(e)) from None


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


def _version() -> str:
    try:
        return version("splitd")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
