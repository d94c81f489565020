"""The outside programs the agents run (losetup, mount, blkid, nbdfuse, ...):
one way to run a tool and report its failure in one line, and nbdfuse
started and waited for. Used by agents/host/attach.py (volumes attached on
the application host) and agents/backup/files.py (a snapshot's files).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
from typing import Any

CMD_TIMEOUT = 60.0
NBDFUSE_START_TIMEOUT = 15.0


class ToolFailed(Exception):
    """A tool is missing, failed or hung; the message says which and why."""


def run_tool(args: list[str], what: str, timeout: float = CMD_TIMEOUT) -> str:
    """Run `args`; its stdout, stripped. ToolFailed("WHAT: stderr") if it fails."""
    try:
        cp = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise ToolFailed(f"{what}: {args[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise ToolFailed(f"{what}: {args[0]} did not finish in {timeout:g} s") from None
    if cp.returncode != 0:
        err = " ".join((cp.stderr or cp.stdout).split()) or f"exit status {cp.returncode}"
        raise ToolFailed(f"{what}: {err}")
    return cp.stdout.strip()


def nbdfuse_source(uri: str, tls_certificates: str | None, *, read_only: bool) -> list[str]:
    """nbdfuse's arguments for the export at `uri`. With `tls_certificates` (a
    directory in libnbd's layout: ca-cert.pem, and client-cert.pem and
    client-key.pem if the server asks for them) nbdkit's nbd plugin connects,
    on nbdfuse's stdin/stdout (--command), given the directory as its own
    parameter: nbdfuse refuses a URI's tls-certificates= (libnbd's URI policy
    denies local file access, nbd_set_uri_allow_local_file), and without a CA
    libnbd falls back to the system's CAs and does not verify the server."""
    if tls_certificates is None:
        return [uri]
    return ["--command", "nbdkit", "-s", "--exit-with-parent", *(["-r"] if read_only else []),
            "nbd", f"uri={uri}", *(["tls=require"] if uri.startswith("nbds") else []),
            f"tls-certificates={tls_certificates}"]


def start_nbdfuse(fuse_dir: str, source: list[str], uri: str, *, read_only: bool, pidfile: str,
                  log_path: str, timeout: float = NBDFUSE_START_TIMEOUT,
                  **popen: Any) -> subprocess.Popen[bytes]:
    """nbdfuse showing an export as FUSE_DIR/nbd (`source`: a URI, or
    nbdfuse's other modes such as --command), returned once it has written
    its pidfile (it has connected and mounted). `popen`: more Popen
    arguments (start_new_session, preexec_fn). ToolFailed, with the tail of
    its log, if it exits or takes longer than `timeout` (then it is killed
    and FUSE_DIR unmounted)."""
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(["nbdfuse", *(["-r"] if read_only else []), "-P", pidfile,
                                     fuse_dir, *source],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    **popen)
        except FileNotFoundError:
            raise ToolFailed("nbdfuse is not installed") from None
    deadline = time.monotonic() + timeout
    while not os.path.exists(pidfile):
        if proc.poll() is not None or time.monotonic() > deadline:
            with open(log_path, errors="replace") as f:
                tail = " ".join(f.read().split())[-300:]
            proc.kill()
            proc.wait()
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["fusermount3", "-u", fuse_dir], capture_output=True, timeout=CMD_TIMEOUT)
            raise ToolFailed(f"nbdfuse could not open {uri}: {tail or 'no message'}")
        time.sleep(0.05)
    return proc
