"""The command line's rules: the parser class, the argument types and how a
command is declared. Everything here runs before anything is sent, and every
refusal is a UsageError (exit 2).

A command is declared with Commands.command(): its `run(client, args)` makes
the admin call(s) and returns the result, its `show(result, args)` prints it
for people, and an optional `check(args)` looks at its arguments together (a
volume paired with itself) and raises BadInput. The three ride on the parsed
namespace (args.run, args.show, args.check), with the command's own parser
(args.parser) for the error message.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from common.errors import BadInput
from common.names import parse_rate, parse_region_size, parse_size, validate_name
from splitctl.client import (
    DEFAULT_SOCKET,
    ENV_CONNECT,
    ENV_SOCKET,
    ENV_TLS_CA,
    ENV_TOKEN_FILE,
    AdminClient,
)

PROG = "splitctl"

EXIT_REFUSED, EXIT_USAGE, EXIT_TIMEOUT, EXIT_UNREACHABLE = 1, 2, 3, 4

EXIT_STATUS = f"""\
exit status:
  0  success
  1  splitd refused the request, or stopped answering (the reason is printed)
  2  the command line is wrong (nothing was sent)
  3  pair wait: the pair did not get there before --timeout
  4  splitd could not be reached (no socket, not a socket, connection
     refused, permission denied; remote: unreachable, or TLS failed)

With --json, a failure prints {{"error": {{"code": ..., "message": ...}}}} on
stdout as well as the message on stderr.

environment:
  {ENV_SOCKET}  admin socket to use when --socket is not given
                       (default {DEFAULT_SOCKET})
  {ENV_CONNECT}       a remote daemon, as --connect
  {ENV_TOKEN_FILE}    its token, as --token-file
  {ENV_TLS_CA}        the CA of its certificate, as --tls-ca
"""

JSON_HELP = "print the daemon's reply as JSON instead of text"

Run = Callable[[AdminClient, argparse.Namespace], Any]
# A command that talks to another server than the daemon (backup prepare: the
# host agent) makes its own client from its arguments; BadInput is exit 2.
MakeClient = Callable[[argparse.Namespace], AdminClient]
Show = Callable[[Any, argparse.Namespace], None]
Check = Callable[[argparse.Namespace], None]

# What argparse takes for a negative number rather than an option ("-5",
# "-1.5"); none of our options looks like one, so these are always values.
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


class UsageError(Exception):
    """The command line is wrong: `message`, and the command whose --help says
    how to get it right (`prog`). main() prints it and exits 2."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog
        self.message = message


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a UsageError (printed as one line by
    main), and an option the command does not have is named as such, with a
    pointer to that command's --help.

    argparse sets an unknown option aside and goes on, so `volume create -x 1M`
    would fail on a missing SIZE, and one after a complete command would be
    reported by the top-level parser, pointing to `splitctl --help`.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        # Filled by add_argument (argparse adds -h through it too): the
        # options this parser has, and whether it has commands.
        self.options: dict[str, argparse.Action] = {}
        self.has_commands = False
        self._seen: tuple[str, ...] = ()     # the arguments this parser was given
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        for option in action.option_strings:
            self.options[option] = action
        return action

    def add_subparsers(self, **kwargs: Any) -> Any:
        self.has_commands = True
        return super().add_subparsers(**kwargs)

    def error(self, message: str) -> NoReturn:
        unknown = self._unknown_option(self._seen)
        if unknown is not None:
            message = f"unrecognized option {unknown}"
        raise UsageError(self.prog, message)

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        self._seen = tuple(sys.argv[1:] if args is None else args)
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            # Extras are refused here, by the innermost parser that has them;
            # the command's own parser (set_defaults) is the one to point to.
            parser = getattr(parsed, "parser", None) or self
            option = next((a for a in extras if self._looks_like_option(a)), None)
            message = (f"unrecognized option {option}" if option is not None
                       else f"unrecognized arguments: {' '.join(extras)}")
            raise UsageError(parser.prog, message)
        return parsed, extras

    def _looks_like_option(self, arg: str) -> bool:
        # As argparse sees it: "-5" and "-1.5" are values (no option of ours
        # looks like a negative number), so is "-" and anything with a space.
        return (len(arg) > 1 and arg[0] in self.prefix_chars and " " not in arg
                and not _NEGATIVE_NUMBER.match(arg))

    def _unknown_option(self, args: Sequence[str]) -> str | None:
        """The first argument of `args` that looks like an option this parser
        does not have (`--so` abbreviates `--socket`; `-xVALUE` is `-x`). A
        parser with subcommands looks only as far as its first argument that
        is not an option or an option's value: what follows is a command's."""
        options = self.options
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
                if self.has_commands:
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


def add_shared_options(parser: Parser) -> None:
    """--json, --socket and the remote options, on a command or command group:
    they work before or after the command. These copies default to SUPPRESS
    so they never overwrite the top-level parser's value."""
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help=JSON_HELP)
    parser.add_argument("--socket", metavar="PATH", type=socket_path,
                        default=argparse.SUPPRESS,
                        help="admin socket of splitd (see below for the default)")
    add_remote_options(parser, argparse.SUPPRESS)


def add_remote_options(parser: Parser, default: Any) -> None:
    """--connect, --token-file, --tls-ca: a remote daemon (its --admin-listen)."""
    parser.add_argument("--connect", metavar="tcp://HOST:PORT", default=default,
                        help=f"a remote splitd's admin port, over TLS with a token "
                             f"(default: ${ENV_CONNECT}; none: the admin socket)")
    parser.add_argument("--token-file", metavar="FILE", default=default,
                        help=f"file holding the token for --connect (default: ${ENV_TOKEN_FILE})")
    parser.add_argument("--tls-ca", metavar="PEM", default=default,
                        help=f"CA certificate that signed the daemon's (default: ${ENV_TLS_CA}, "
                             "else the system's CAs)")


class Commands:
    """The commands (or command groups) under one parser, each with the shared
    options, its examples and the exit statuses at the end of its --help."""

    def __init__(self, parser: Parser, title: str):
        self._choices = parser.add_subparsers(title=title, metavar="COMMAND", required=True)

    def _add(self, name: str, help: str, description: str, examples: str,
             exit_status: str = EXIT_STATUS, daemon_options: bool = True) -> Parser:
        sub: Parser = self._choices.add_parser(
            name, help=help, formatter_class=argparse.RawDescriptionHelpFormatter,
            description=description, epilog=f"examples:\n{examples}\n\n{exit_status}")
        if daemon_options:
            add_shared_options(sub)
        else:
            sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                             help="print the reply as JSON instead of text")
        return sub

    def group(self, name: str, title: str, help: str, description: str,
              examples: str, daemon_options: bool = True) -> Commands:
        """A command group (`splitctl volume ...`): returns its own commands."""
        return Commands(self._add(name, help, description, examples,
                                  daemon_options=daemon_options), title)

    def command(self, name: str, run: Run, show: Show, help: str, description: str,
                examples: str, check: Check | None = None, client: MakeClient | None = None,
                exit_status: str = EXIT_STATUS) -> Parser:
        """`client`: the command's own server (not the daemon): the daemon's
        --socket and --connect options are left out, and `client(args)` makes
        what `run` gets."""
        sub = self._add(name, help, description, examples, exit_status,
                        daemon_options=client is None)
        sub.set_defaults(run=run, show=show, check=check, parser=sub, client=client)
        return sub


# -- argument types: the same checks as the daemon's, before anything is sent --

def _checked(check: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
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


socket_path = _checked(_check_socket_path, "socket path")
name = _checked(validate_name, "volume name")
size = _checked(parse_size, "size")
region_size = _checked(parse_region_size, "region size")
rate = _checked(parse_rate, "rate")
timeout = _checked(lambda text: parse_duration(text, "timeout"), "timeout")
interval = _checked(lambda text: parse_duration(text, "interval", positive=True), "interval")
