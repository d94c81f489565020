"""The coordinated split end to end, across three hosts (issue 11, "Tests"):
the daemon in `storage`; the host agent in `app` (splitd-host serve with TLS
and a token) with the primary attached through the daemon's `app` port
(nbdfuse + loop), ext4 on it, mounted, and a writer writing files; from
`backup`, over TCP with TLS and a token, `splitctl backup prepare`, then the
secondary read through the URI it answered (the `backup` port, TLS), attached
read-only there, checked clean (fsck -n) and holding every file whose write
completed before the freeze, and none begun after the thaw.

Then what goes wrong between hosts, each with a clear error and nothing left
frozen: the daemon unreachable from the application host during prepare
(its management address gone: the data path, on another address, goes on);
plaintext to the agent's and the daemon's TLS-only ports; a wrong, revoked
or out-of-scope token. The failures on the application host alone (hooks,
kill -9, freeze refused, a pair in error) are tests/agents/host's.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agents.host.attach import nbdfuse_args
from harness.site import ADMIN_HOST, ADMIN_PORT, AGENT_PORT, BACKUP_PORT
from harness.writer import records
from tests.agents.host.conftest import Host, writable
from tests.conftest import need

MiB = 1 << 20
SIZE = 128 * MiB
FREEZE_TIMEOUT = 5      # the agent's watchdog timeout (and its daemon calls')
LATE = 8                # how long a late split is waited for (TCP retransmits at
                        # 6.2 and 12.6 s after a first send)


@dataclass
class AppHost:
    base: Path          # the module's directory
    state: Path         # the agent's state directory
    mnt: Path           # where the primary's ext4 is mounted
    data: Path          # the directory backed up
    token: Path         # an agent token of scope prepare for mnt/*


@pytest.fixture(scope="module")
def app(site, tmp_path_factory):
    """The application host: volume db (ext4) paired with db-snap, attached
    in `app` through the daemon's app port and mounted; the agent serving
    there; a token for it. Yields an AppHost."""
    need("nbdfuse", "nbdkit", "fusermount3", "losetup", "mkfs.ext4", "fsck.ext4", "mount",
         "umount", "ip")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    base = tmp_path_factory.mktemp("app")
    site.ext4_pair("db", "db-snap", SIZE)
    state = base / "agent"
    host = Host(state)
    mnt = base / "mnt"
    mnt.mkdir()
    served = None
    try:
        site.attach_primary(state, "db", mnt)
        (mnt / "data").mkdir()
        # The pre-freeze hook runs ACTION when a test has written it: a way
        # to act after the agent has connected to the daemon, before the freeze.
        hook = base / "hook.sh"
        hook.write_text(f"#!/bin/sh\nif [ \"$1\" = freeze ] && [ -f {base}/ACTION ]; then "
                        f"sh {base}/ACTION; fi\nexit 0\n")
        hook.chmod(0o755)
        served = site.serve_agent(state, "--hook", hook, "--watchdog-timeout", str(FREEZE_TIMEOUT))
        yield AppHost(base, state, mnt, mnt / "data",
                      site.agent_token(state, "backup", "prepare", f"{mnt}/*"))
    finally:
        if served is not None:
            site.net.stop(served, timeout=15)
        host.cleanup()


@contextlib.contextmanager
def writer(site, app, name: str):
    """The writer (harness/writer.py) in `app`, writing into DATA/NAME; yields
    its log's path once it has written a few files."""
    log = app.base / f"{name}.log"
    proc = site.writer(app.data / name, log)
    try:
        yield log
    finally:
        site.net.stop(proc, timeout=15)


def wait_records(log: Path, after: float, count: int, within: float = 20) -> None:
    """Until the writer has completed `count` files begun after `after`."""
    deadline = time.monotonic() + within
    while sum(r["started"] > after for r in records(str(log))) < count:
        assert time.monotonic() < deadline, f"the writer is stuck (frozen?) since {after}"
        time.sleep(0.05)


def error_of(cp: subprocess.CompletedProcess) -> dict:
    """The --json error of a failed splitctl, checked for one clear line."""
    assert cp.returncode != 0, cp.stdout
    assert cp.stderr.count("\n") == 1 and cp.stderr.startswith("splitctl: "), cp.stderr
    return json.loads(cp.stdout)["error"]


def splittable(site) -> None:
    """A pair split by an earlier test goes back to resync (split is taken
    from copy, pair or resync; controller/states.py)."""
    if site.daemon.call("pair.show", name="db-snap")["state"] == "split":
        site.daemon.call("pair.resync", name="db-snap")


def assert_not_frozen(app) -> None:
    assert writable(app.mnt, timeout=5.0), f"{app.mnt} is frozen"
    assert not list((app.state / "frozen").glob("*.json")), "the freeze journal is not empty"


# -- the backup of a directory, end to end ---------------------------------------------------

def test_prepare_from_the_backup_host(site, app, tmp_path):
    splittable(site)
    with writer(site, app, "e2e") as log:
        cp = site.backup_prepare(app.data, app.token, timeout=120)
        assert cp.returncode == 0, cp.stderr
        answer = json.loads(cp.stdout)
        thawed_by = answer["frozen_at"] + answer["window_ms"] / 1000
        wait_records(log, thawed_by, 5)         # writes go on: thawed
    assert answer["uri"] == f"nbds://{site.storage_backup}:{BACKUP_PORT}/db-snap"
    assert answer["pair"] == "db-snap" and answer["volume"] == "db"
    assert answer["mountpoint"] == str(app.mnt) and answer["state"] == "split"
    assert 0 < answer["window_ms"] < 10_000 and answer["warnings"] == []
    assert_not_frozen(app)
    # The daemon, asked from the backup host, agrees on the image's generation.
    reader = site.daemon_token("backup-reader", "read")
    located = json.loads(site.splitctl("backup", "--json", "locate", "db-snap", "--port", "backup",
                                       token=reader, check=True).stdout)
    assert located["uri"] == answer["uri"] and located["state"] == "split"
    assert located["split_gen"] == answer["split_gen"] >= 1

    # The backup host reads the image through the URI, with the CA (TLS)...
    uri = site.tls_uri(answer["uri"])
    info = json.loads(site.net.run("backup", ["nbdinfo", "--json", uri], check=True).stdout)
    assert info["exports"][0]["export-size"] == SIZE
    # ...and attaches it read-only there (nbdfuse + loop).
    image = tmp_path / "image"
    image.mkdir()
    with attached_read_only(site, answer["uri"], tmp_path / "fuse") as device:
        fsck = subprocess.run(["fsck.ext4", "-n", "-f", device], capture_output=True,
                              text=True, timeout=120)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        subprocess.run(["mount", "-o", "ro", device, str(image)], check=True,
                       capture_output=True, timeout=60)
        try:
            check_image(image / "data" / "e2e", records(str(log)), answer["frozen_at"],
                        thawed_by)
        finally:
            subprocess.run(["umount", str(image)], capture_output=True, timeout=60)


@contextlib.contextmanager
def attached_read_only(site, uri: str, fuse_dir: Path):
    """The export at `uri` (nbds://) as a read-only loop device, read from the
    backup host: nbdfuse -r over nbdkit's nbd plugin, which takes the test CA
    (nbdfuse itself refuses a URI's tls-certificates=, local file access).
    Yields the device; everything is undone after."""
    fuse_dir.mkdir()
    pidfile = fuse_dir.with_suffix(".pid")
    proc = site.net.popen("backup", nbdfuse_args(uri, fuse_dir, pidfile, read_only=True,
                                                 tls_certificates=str(site.nbd_certs)),
                          stderr=subprocess.PIPE)
    device = None
    try:
        deadline = time.monotonic() + 20
        while not pidfile.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "nbdfuse did not start in 20 s"
            time.sleep(0.05)
        device = subprocess.run(["losetup", "--find", "--show", "--read-only", fuse_dir / "nbd"],
                                check=True, capture_output=True, text=True,
                                timeout=60).stdout.strip()
        yield device
    finally:
        if device:
            subprocess.run(["losetup", "-d", device], capture_output=True, timeout=60)
        subprocess.run(["fusermount3", "-u", fuse_dir], capture_output=True, timeout=60)
        site.net.stop(proc)


def check_image(folder: Path, written: list[dict], frozen_at: float, thawed_by: float) -> None:
    """Every file complete before the freeze is there with its checksum; no
    file begun after the thaw is."""
    before = [r for r in written if r["done"] < frozen_at]
    after = [r for r in written if r["started"] > thawed_by]
    assert len(before) >= 10 and after
    for r in before:
        data = (folder / r["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"], f"{r['name']} differs"
    for r in after:
        assert not (folder / r["name"]).exists(), f"{r['name']} was written after the split"


# -- failures between hosts ---------------------------------------------------------------

def test_daemon_unreachable_during_prepare(site, app):
    """The daemon's management address goes away (the app host's path to the
    admin API): prepare fails before freezing, naming the daemon; the
    primary's data path, on the app port's own address, is untouched."""
    splittable(site)
    site.net.del_address("storage", "app", ADMIN_HOST)
    try:
        site.net.flush_neighbours("app")     # no stale ARP entry: unreachable at once
        with writer(site, app, "unreachable") as log:
            started = time.time()
            cp = site.backup_prepare(app.data, app.token, timeout=120)
            err = error_of(cp)
            assert err["code"] == "daemon-unreachable", err
            assert site.admin_host in err["message"], err
            assert cp.returncode == 1
            assert time.time() - started < 30
            wait_records(log, time.time(), 5)     # the primary takes writes meanwhile
        assert_not_frozen(app)
    finally:
        site.net.add_address("storage", "app", ADMIN_HOST)
    # And once it is back, prepare works again.
    cp = site.backup_prepare(app.data, app.token, timeout=120)
    assert cp.returncode == 0, cp.stderr


def test_daemon_unreachable_inside_the_freeze_window(site, app):
    """The management address goes away after the agent has connected to the
    daemon, just before the freeze (from the pre-freeze hook): the split never
    gets there; the agent thaws at its timeout and says so, and the split it
    gave up on does not happen later either, once the address is back."""
    splittable(site)
    before = site.daemon.call("pair.show", name="db-snap")["split_at"]
    action = app.base / "ACTION"
    action.write_text(shlex.join(site.net.cmd("storage", [
        "ip", "addr", "del", f"{site.admin_host}/29", "dev", site.net.ifname("storage", "app")]))
        + "\n")
    try:
        with writer(site, app, "inside") as log:
            started = time.monotonic()
            err = error_of(site.backup_prepare(app.data, app.token, timeout=120))
            assert err["code"] in ("split-failed", "watchdog-thawed"), err
            assert time.monotonic() - started < FREEZE_TIMEOUT + 10
            wait_records(log, time.time(), 5)
        assert_not_frozen(app)
    finally:
        action.unlink(missing_ok=True)
        if site.admin_host not in site.net.addresses("storage", "app"):
            site.net.add_address("storage", "app", ADMIN_HOST)
    # TCP still retransmits the request the agent gave up on (its socket
    # closed normally: the kernel goes on sending what it holds), and it is
    # delivered once the address is back, unless the agent aborted the
    # connection (SO_LINGER 0: RST, queued data dropped). A late split is an
    # image nobody froze the filesystem for, and a pair left split.
    deadline = time.monotonic() + LATE
    while time.monotonic() < deadline:
        pair = site.daemon.call("pair.show", name="db-snap")
        assert pair["split_at"] == before, (f"the split the agent gave up on was made later, "
                                            f"after the thaw, at {pair['split_at']}")
        time.sleep(0.2)


PLAIN = ("import socket, sys\n"
         "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)\n"
         "s.sendall(b'{\"id\": 1, \"method\": \"auth\", \"params\": {\"token\": \"x\"}}\\n')\n"
         "data = b''\n"
         "try:\n"
         "    while chunk := s.recv(4096):\n"
         "        data += chunk\n"
         "except OSError as e:\n"
         "    print('error', e.errno, file=sys.stderr)\n"
         "sys.stdout.write(data.hex())\n")


@pytest.mark.parametrize("where", ["agent", "daemon"])
def test_plaintext_to_a_tls_port_is_refused(site, app, where):
    """A plaintext request line to the agent's port or the daemon's remote
    admin port gets no answer: the connection closes (after a TLS alert at
    most), and nothing is prepared."""
    host, port = ((site.app_addr, AGENT_PORT) if where == "agent"
                  else (site.storage_backup, ADMIN_PORT))
    cp = site.net.run("backup", ["python3", "-c", PLAIN, host, str(port)], timeout=60)
    assert cp.returncode == 0, cp.stderr
    reply = bytes.fromhex(cp.stdout)
    assert b"{" not in reply, reply
    assert reply == b"" or reply[0] == 0x15, reply      # 0x15: a TLS alert record
    assert_not_frozen(app)


def test_tokens_from_the_backup_host(site, app):
    """Wrong, revoked, out-of-scope: refused before anything is frozen, each
    with its code, in one line."""
    wrong = app.base / "wrong.token"
    wrong.write_text("not-a-token-" + "x" * 40 + "\n")
    err = error_of(site.backup_prepare(app.data, wrong))
    assert err["code"] == "unauthorized", err

    revoked = site.agent_token(app.state, "revoked", "prepare")
    site.agent("app", app.state, "token", "revoke", "revoked")
    err = error_of(site.backup_prepare(app.data, revoked))
    assert err["code"] == "unauthorized", err

    reader = site.agent_token(app.state, "monitor", "read")
    err = error_of(site.backup_prepare(app.data, reader))
    assert err["code"] == "forbidden" and "prepare" in err["message"], err

    elsewhere = site.agent_token(app.state, "elsewhere", "prepare", "/srv/*")
    err = error_of(site.backup_prepare(app.data, elsewhere))
    assert err["code"] == "forbidden" and str(app.data) in err["message"], err

    # A daemon token is not an agent token.
    daemon_token = site.daemon_token("not-for-agents", "admin")
    err = error_of(site.backup_prepare(app.data, daemon_token))
    assert err["code"] == "unauthorized", err
    assert_not_frozen(app)
    assert site.daemon.call("pair.show", name="db-snap")["state"] in ("pair", "split")
