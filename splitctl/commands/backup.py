"""splitctl backup prepare: ask a host agent (splitd-host serve, on the
application host) to freeze, split and thaw the filesystem holding a
directory, and print where the consistent image can be read.

It talks to the agent, not to the daemon: TCP with TLS and a bearer token made
by `splitd-host token create` on that host (not a splitctl token).
"""
from __future__ import annotations

import argparse
import os
from argparse import Namespace
from typing import Any

from common.errors import BadInput, ErrorCode
from splitctl.args import EXIT_USAGE, Commands
from splitctl.client import (
    DEFAULT_AGENT_PORT,
    ENV_HOST_TLS_CA,
    ENV_HOST_TOKEN_FILE,
    AdminClient,
    AdminError,
    RemoteAdminClient,
    parse_connect,
)
from splitctl.commands import backup_agent, backup_served
from splitctl.commands.port import port_name
from splitctl.output import print_fields

# A prepare is a freeze (bounded by the agent's watchdog, 10 s by default), a
# hook (30 s) and a few daemon calls: wait longer than those for the answer.
PREPARE_TIMEOUT = 120.0

EXIT_STATUS = f"""\
exit status:
  0  prepared
  1  the agent refused or failed (its code and message are printed: not-splitd,
     busy, pair-error, hook-failed, freeze-failed, split-failed, ...), or the
     token was refused (unauthorized: unknown or revoked; forbidden: out of
     its scope or directories)
  {EXIT_USAGE}  the command line is wrong (nothing was sent)
  4  the agent could not be reached (connection refused, unknown host,
     TLS failed: untrusted certificate, or not a TLS port)

With --json, a failure prints {{"error": {{"code": ..., "message": ...}}}} on
stdout as well as the message on stderr.

environment:
  {ENV_HOST_TOKEN_FILE}  the agent's token, as --token-file
  {ENV_HOST_TLS_CA}      the CA of its certificate, as --tls-ca
"""


# Errors that are not the agent's answer to the prepare itself: the
# connection, TLS, or the token (their messages say so already).
NOT_REFUSALS = (ErrorCode.UNREACHABLE, ErrorCode.TLS, ErrorCode.PROTOCOL, ErrorCode.UNAUTHORIZED,
                ErrorCode.FORBIDDEN, ErrorCode.BAD_INPUT)


class HostAgentClient(RemoteAdminClient):
    """The host agent's API: the same protocol as a remote splitd's admin API."""

    peer = "splitd-host"
    port_hint = "is it the agent's port, splitd-host serve --listen?"


def host_uri(host: str) -> str:
    """tcp://HOST:PORT from HOST, HOST:PORT, [V6] or [V6]:PORT; BadInput if it is none."""
    text = host.strip()
    if not text:
        raise BadInput("--host is empty: give the application host, HOST or HOST:PORT")
    if text.startswith("["):
        addr, _, rest = text[1:].partition("]")
        uri = f"tcp://[{addr}]{rest if rest else f':{DEFAULT_AGENT_PORT}'}"
    elif text.count(":") == 1:
        uri = f"tcp://{text}"
    elif ":" in text:
        uri = f"tcp://[{text}]:{DEFAULT_AGENT_PORT}"     # a bare IPv6 address
    else:
        uri = f"tcp://{text}:{DEFAULT_AGENT_PORT}"
    try:
        parse_connect(uri)
    except ValueError:
        raise BadInput(f"--host {host!r}: give HOST, HOST:PORT or [IPv6]:PORT "
                       f"(the agent's port, default {DEFAULT_AGENT_PORT})") from None
    return uri


def agent_client(args: Namespace) -> AdminClient:
    if args.connect or args.socket:
        raise BadInput("backup prepare talks to the host agent (--host), not to the daemon: "
                       "drop --connect/--socket")
    uri = host_uri(args.host)
    token_file = getattr(args, "token_file", None) or os.environ.get(ENV_HOST_TOKEN_FILE)
    if not token_file:
        raise BadInput(f"backup prepare needs the agent's token: --token-file FILE (or "
                       f"${ENV_HOST_TOKEN_FILE}), made by 'splitd-host token create' there")
    try:
        with open(token_file) as f:
            secret = f.read(4096)
    except OSError as e:
        raise BadInput(f"cannot read the token file {token_file}: {e.strerror or e}") from None
    ca = getattr(args, "tls_ca", None) or os.environ.get(ENV_HOST_TLS_CA)
    try:
        return HostAgentClient(uri, secret, ca, timeout=PREPARE_TIMEOUT)
    except ValueError as e:
        raise BadInput(str(e)) from None


def run_prepare(client: AdminClient, args: Namespace) -> Any:
    try:
        # resync only when asked: an agent older than it is still called as before.
        extra = {"resync": True} if getattr(args, "resync", False) else {}
        return client.call("prepare", directory=args.dir, port=args.port, **extra)
    except AdminError as e:
        if e.code not in NOT_REFUSALS:
            # The agent's refusal: its code first, for people and scripts alike.
            raise AdminError(e.code, f"{client.where} refused to prepare {args.dir}: "
                                     f"{e.code}: {e.message}", e.method) from None
        raise


def show_prepare(result: dict[str, Any], args: Namespace) -> None:
    # The URI alone on the first line, as `splitctl locate` prints it.
    print(result["uri"])
    fields = [
        ("pair", result["pair"] + (f" (group {result['group']})" if result.get("group") else "")),
        # split_gen counts the pair's splits (None from a daemon that does not
        # count them); generation is its bitmap generation.
        ("split gen", "-" if result.get("split_gen") is None else str(result["split_gen"])),
        ("generation", str(result.get("generation"))),
        ("frozen", f"{result.get('window_ms')} ms (FIFREEZE {result.get('freeze_ms')} ms)"),
        ("prepare", f"{result.get('prepare_ms')} ms"),
        ("directory", f"{result.get('directory')} on {result.get('mountpoint')} "
                      f"({result.get('device')}, volume {result.get('volume')})"),
        ("port", f"{result.get('port')} (TLS {result.get('tls')})"),
    ]
    fields += [("warning", w) for w in result.get("warnings") or []]
    print_fields(fields)


def add_commands(commands: Commands) -> None:
    backup = commands.group(
        "backup", "backup commands", help="backups: prepare, run, list, verify, prune, restore",
        description="Backups of directories on application hosts. `prepare` asks the\n"
                    "host agent there (splitd-host serve) for a consistent split image;\n"
                    "`run` streams it (or a pair, or any export) into a backup store;\n"
                    "the other commands look after the store and restore from it.",
        examples="  splitctl backup prepare --host app1 --dir /srv/db --port backup \\\n"
                 "      --token-file app1.token --tls-ca ca.pem",
        daemon_options=False)
    sub = backup.command(
        "prepare", run_prepare, show_prepare,
        help="freeze, split, thaw on the host: print the secondary's NBD URI",
        description="Ask the host agent on HOST to prepare a backup of DIR: it finds the\n"
                    "filesystem holding DIR and the splitd volume under it, runs its\n"
                    "pre-freeze hook, freezes the filesystem (which flushes it), has the\n"
                    "daemon split the volume's pair (or its consistency group), thaws,\n"
                    "runs the post-thaw hook, and answers with the secondary's NBD URI as\n"
                    "reached through the daemon's port PORT.\n\n"
                    "Printed: the URI alone on the first line, then the pair (and group),\n"
                    "the split generation, how long the filesystem was frozen (FIFREEZE to\n"
                    "FITHAW) and how long the prepare took on the host. With --json, the\n"
                    "agent's answer: uri, uris, port, tls, pair, group, volume, directory,\n"
                    "mountpoint, device, split_gen, delta_base, generation, split_at, state,\n"
                    "freeze_ms, window_ms, prepare_ms, warnings (split_gen and delta_base\n"
                    "are null from a daemon that does not count splits).\n\n"
                    "The agent is reached over TCP with TLS, with a token made there by\n"
                    "'splitd-host token create NAME --scope prepare' (a splitctl token does\n"
                    f"not work). Its port defaults to {DEFAULT_AGENT_PORT}.",
        examples="  splitctl backup prepare --host app1 --dir /srv/db --port backup \\\n"
                 "      --token-file app1.token --tls-ca ca.pem\n"
                 "  SPLITD_HOST_TOKEN_FILE=app1.token splitctl backup prepare \\\n"
                 "      --host 192.0.2.10:10811 --dir /srv/db --port backup --json",
        client=agent_client, exit_status=EXIT_STATUS)
    sub.add_argument("--host", metavar="HOST[:PORT]", required=True,
                     help=f"the application host's agent (port default {DEFAULT_AGENT_PORT}; "
                          "IPv6 as [ADDR]:PORT)")
    sub.add_argument("--dir", metavar="DIR", required=True,
                     help="the directory to back up, as a path on that host")
    sub.add_argument("--port", metavar="NAME", type=port_name, required=True,
                     help="the daemon's port the secondary is to be reached through "
                          "(splitctl port list)")
    # SUPPRESS: given before the command (splitctl --token-file F backup ...) counts too.
    sub.add_argument("--token-file", metavar="FILE", default=argparse.SUPPRESS,
                     help=f"file holding the agent's token (default: ${ENV_HOST_TOKEN_FILE})")
    sub.add_argument("--tls-ca", metavar="PEM", default=argparse.SUPPRESS,
                     help=f"CA certificate that signed the agent's (default: ${ENV_HOST_TLS_CA}, "
                          "else the system's CAs)")
    sub.add_argument("--resync", action="store_true",
                     help="a pair left split by the previous prepare is resynced first "
                          "(its split image released) instead of refused")
    backup_agent.add_commands(backup)
    backup_served.add_commands(backup)
