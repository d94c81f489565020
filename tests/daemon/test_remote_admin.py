"""The remote admin API (daemon/remote_admin.py): the admin API on TCP, only
over TLS and only with a bearer token; tokens made, listed and revoked with
splitctl over the admin socket. Real daemon, real TLS with a throw-away CA,
splitctl --connect as the client (and raw sockets for what it would not send).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from harness.splitd import DaemonFailed
from splitctl.client import AdminError, RemoteAdminClient
from tests.conftest import free_tcp_port, need
from tests.daemon.pki import make_ca, make_server_cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    need("openssl")
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    cert, key = make_server_cert(d)
    other_ca = make_ca(d, "other-ca")     # trusted by nobody here
    return {"ca": ca, "cert": cert, "key": key, "other_ca": other_ca}


def remote_daemon(make_daemon, pki, *extra: str):
    port = free_tcp_port()
    d = make_daemon(["--admin-listen", f"tcp://127.0.0.1:{port}", "--tls-cert", str(pki["cert"]),
                     "--tls-key", str(pki["key"]), *extra])
    d.admin_port = port
    d.admin_uri = f"tcp://127.0.0.1:{port}"
    return d


@pytest.fixture
def rd(make_daemon, pki):
    d = remote_daemon(make_daemon, pki)
    for name in ("db", "web"):
        d.create_volume(name, "4M")
        d.call("pair.create", primary=name, secondary=f"{name}-snap", create_secondary=True)
    return d


def make_token(d, name: str, scope: str, volumes: str | None = None) -> Path:
    """A token made with splitctl over the admin socket, in a file beside the daemon."""
    args = ["token", "create", name, "--scope", scope]
    if volumes is not None:
        args += ["--volumes", volumes]
    cp = d.splitctl(*args)
    path = d.tmp / f"{name}.token"
    path.write_text(cp.stdout)
    return path


def remote(d, pki, token_file: Path | None, *args: str, ca: Path | None = None,
           check: bool = True, uri: str | None = None):
    """splitctl --connect to the daemon's remote admin port."""
    opts = ["--connect", uri or d.admin_uri, "--tls-ca", str(ca or pki["ca"])]
    if token_file is not None:
        opts += ["--token-file", str(token_file)]
    return d.splitctl(*opts, *args, check=check)


def client(d, pki, secret: str) -> RemoteAdminClient:
    return RemoteAdminClient(d.admin_uri, secret, tls_ca=str(pki["ca"]), timeout=10)


def tls_socket(d, pki) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    raw = socket.create_connection(("127.0.0.1", d.admin_port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def read_reply(sock: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return json.loads(data)


# -- tokens: create, list, revoke -------------------------------------------------------------

def test_token_create_list_revoke(rd):
    cp = rd.splitctl("token", "create", "monitor", "--scope", "read")
    secret = cp.stdout.strip()
    assert cp.stdout == secret + "\n"             # the secret alone: `> file` keeps just it
    assert len(secret) >= 43                      # 32 random bytes, base64url
    assert "shown only this once" in cp.stderr and "scope read" in cp.stderr

    made = json.loads(rd.splitctl("--json", "token", "create", "backup", "--scope", "split",
                                  "--volumes", "db*").stdout)
    assert made["name"] == "backup" and made["scope"] == "split" and made["volumes"] == "db*"
    assert len(made["token"]) >= 43 and made["token"] != secret

    listed = rd.splitctl("token", "list").stdout
    assert "monitor" in listed and "backup" in listed and "db*" in listed and "never" in listed
    as_json = rd.splitctl("token", "list", "--json").stdout
    tokens = {t["name"]: t for t in json.loads(as_json)["tokens"]}
    assert set(tokens) == {"backup", "monitor"}
    assert set(tokens["monitor"]) == {"name", "scope", "volumes", "created", "last_used"}
    assert tokens["monitor"]["last_used"] is None
    for shown in (listed, as_json):
        assert secret not in shown and made["token"] not in shown
        assert hashlib.sha256(secret.encode()).hexdigest() not in shown

    dup = rd.splitctl("token", "create", "monitor", "--scope", "admin", check=False)
    assert dup.returncode == 1 and "exists already" in dup.stderr

    assert "revoked token monitor" in rd.splitctl("token", "revoke", "monitor").stdout
    assert "monitor" not in rd.splitctl("token", "list").stdout
    again = rd.splitctl("token", "revoke", "monitor", check=False)
    assert again.returncode == 1 and "no token named 'monitor'" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["--scope", "root"], "invalid choice"),
    (["--scope", "read", "--volumes", "db*"], "volumes limits only a split token"),
    (["--scope", "admin", "--volumes", "db*"], "volumes limits only a split token"),
])
def test_token_create_refuses(rd, args, message):
    cp = rd.splitctl("token", "create", "t", *args, check=False)
    assert cp.returncode in (1, 2) and message in cp.stderr


def test_secret_is_stored_hashed_only(rd):
    token_file = make_token(rd, "backup", "split", "db*")
    secret = token_file.read_text().strip()
    rd.stop()       # everything on disk, WAL included
    db = sqlite3.connect(rd.data_dir / "splitd.db")
    dump = "\n".join(db.iterdump())
    db.close()
    assert secret not in dump
    assert hashlib.sha256(secret.encode()).hexdigest() in dump
    for f in rd.data_dir.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    assert secret not in rd.log()


# -- a remote call with a good token --------------------------------------------------------------

def test_remote_call_with_good_token(rd, pki):
    token_file = make_token(rd, "monitor", "read")
    status = json.loads(remote(rd, pki, token_file, "--json", "status").stdout)
    assert status["pid"] == rd.pid
    assert "db-snap" in remote(rd, pki, token_file, "pair", "list").stdout
    assert "web" in remote(rd, pki, token_file, "volume", "show", "web").stdout
    [listed] = json.loads(rd.splitctl("--json", "token", "list").stdout)["tokens"]
    assert listed["last_used"] is not None
    assert "authenticated with token monitor" in rd.log()


def test_remote_options_from_environment(rd, pki, monkeypatch):
    token_file = make_token(rd, "monitor", "read")
    monkeypatch.setenv("SPLITD_CONNECT", rd.admin_uri)
    monkeypatch.setenv("SPLITD_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("SPLITD_TLS_CA", str(pki["ca"]))
    assert "db-snap" in rd.splitctl("pair", "list").stdout


def test_split_token_splits_within_its_volumes(rd, pki):
    token_file = make_token(rd, "backup", "split", "db*")
    out = remote(rd, pki, token_file, "--json", "pair", "split", "db-snap").stdout
    assert json.loads(out)["state"] == "split"
    assert rd.call("pair.show", name="db-snap")["state"] == "split"
    assert "(token backup): pair.split" in rd.log()     # who split it, from where


def test_admin_token_manages_tokens_remotely(rd, pki):
    admin = make_token(rd, "ops", "admin")
    cp = remote(rd, pki, admin, "token", "create", "monitor", "--scope", "read")
    assert len(cp.stdout.strip()) >= 43
    assert "monitor" in remote(rd, pki, admin, "token", "list").stdout
    remote(rd, pki, admin, "volume", "create", "logs", "4M")
    assert rd.call("volume.show", name="logs")["size"] == 4 << 20


def test_admin_token_serves_a_backup_snapshot_remotely(rd, pki):
    """backup.serve is answered when the store is open (a thread opens it):
    its reply, or its error, in order on the connection, then the next call."""
    need("nbdinfo")
    admin = make_token(rd, "ops", "admin")
    store = rd.tmp / "store"
    rd.splitctl("backup", "init", str(store))
    sid = json.loads(rd.splitctl("backup", "run", "--volume", rd.uri("db"), "--to", str(store),
                                 "--json").stdout)["snapshot"]
    with client(rd, pki, admin.read_text().strip()) as a:
        with pytest.raises(AdminError) as e:
            a.call("backup.serve", store=str(rd.tmp / "nowhere"), snapshot=sid, name="snap")
        assert e.value.message.startswith("no backup store at "), e.value.message
        served = a.call("backup.serve", store=str(store), snapshot=sid, name="snap")
        assert served["name"] == "snap" and served["size"] == 4 << 20, served
        assert a.call("status")["pid"] == rd.pid
    cp = subprocess.run(["nbdinfo", "--size", rd.uri("snap")], check=True, capture_output=True,
                        text=True)
    assert int(cp.stdout) == 4 << 20


# -- refusals -----------------------------------------------------------------------------------

def test_wrong_token_is_unauthorized(rd, pki):
    make_token(rd, "monitor", "read")
    wrong = rd.tmp / "wrong.token"
    wrong.write_text("not-the-secret-" + "x" * 40 + "\n")
    cp = remote(rd, pki, wrong, "status", check=False)
    assert cp.returncode == 1
    assert cp.stderr.startswith("splitctl: unauthorized: the token is not valid")
    cp = remote(rd, pki, wrong, "--json", "status", check=False)
    assert json.loads(cp.stdout)["error"]["code"] == "unauthorized"
    assert "refused: unauthorized" in rd.log()


def test_revoked_token_is_unauthorized(rd, pki):
    token_file = make_token(rd, "monitor", "read")
    secret = token_file.read_text()
    with client(rd, pki, secret) as c:
        c.call("status")                            # a connection that authenticated
        rd.splitctl("token", "revoke", "monitor")
        with pytest.raises(AdminError) as e:
            c.call("status")                        # the next request on it
        assert e.value.code == "unauthorized" and "revoked" in e.value.message
    cp = remote(rd, pki, token_file, "status", check=False)
    assert cp.returncode == 1 and "unauthorized" in cp.stderr


def test_no_token_is_unauthorized(rd, pki):
    with tls_socket(rd, pki) as s:
        s.sendall(b'{"id": 1, "method": "status"}\n')
        reply = read_reply(s)
        assert reply["error"]["code"] == "unauthorized"
        assert "needs a token first" in reply["error"]["message"]
        assert s.recv(100) == b""                   # and closed
    cp = remote(rd, pki, None, "status", check=False)
    assert cp.returncode == 2 and "error: --connect needs a token" in cp.stderr


def test_read_token_cannot_split(rd, pki):
    token_file = make_token(rd, "monitor", "read")
    cp = remote(rd, pki, token_file, "pair", "split", "db-snap", check=False)
    assert cp.returncode == 1
    assert ("forbidden: token 'monitor' has scope read; pair.split needs scope split"
            in cp.stderr)
    cp = remote(rd, pki, token_file, "--json", "volume", "create", "x", "4M", check=False)
    assert json.loads(cp.stdout)["error"]["code"] == "forbidden"
    cp = remote(rd, pki, token_file, "token", "list", check=False)
    assert cp.returncode == 1 and "needs scope admin" in cp.stderr
    assert rd.call("pair.show", name="db-snap")["state"] != "split"


def test_split_token_cannot_split_outside_its_volumes(rd, pki):
    token_file = make_token(rd, "backup", "split", "db*")
    cp = remote(rd, pki, token_file, "pair", "split", "web-snap", check=False)
    assert cp.returncode == 1
    assert ("forbidden: token 'backup' may split only pairs of volumes matching 'db*'; "
            "pair 'web-snap' has volume 'web'") in cp.stderr
    assert rd.call("pair.show", name="web-snap")["state"] != "split"
    # Nor other changes, of any volume.
    cp = remote(rd, pki, token_file, "pair", "restore", "db-snap", check=False)
    assert cp.returncode == 1 and "needs scope admin" in cp.stderr


def test_split_token_resyncs_only_a_split_pair_of_its_volumes(rd, pki):
    """What the host agent's prepare --resync needs: a normal resync of a
    split pair (the delta chain kept). Not a pair outside its glob, not one
    mirroring, and not a full resync from error: that one is an admin's."""
    token_file = make_token(rd, "backup", "split", "db*")
    first = json.loads(remote(rd, pki, token_file, "--json", "pair", "split", "db-snap").stdout)
    out = json.loads(remote(rd, pki, token_file, "--json", "pair", "resync", "db-snap").stdout)
    assert out["state"] in ("resync", "pair") and out["delta_base"] == first["split_gen"], out
    assert "(token backup): pair.resync" in rd.log()
    cp = remote(rd, pki, token_file, "pair", "resync", "db-snap", check=False)
    assert cp.returncode == 1 and (f"forbidden: pair 'db-snap' is in state {out['state']}"
                                   in cp.stderr or "state pair" in cp.stderr), cp.stderr
    assert "may resync only a pair in state split" in cp.stderr
    rd.call("pair.split", name="web-snap")
    cp = remote(rd, pki, token_file, "pair", "resync", "web-snap", check=False)
    assert cp.returncode == 1 and "pair 'web-snap' has volume 'web'" in cp.stderr
    assert rd.call("pair.show", name="web-snap")["state"] == "split"

    # In error (the pending bitmap of a split pair lost while the daemon is
    # down, as in tests/pairs/test_restart.py): refused, still in error.
    rd.create_volume("dberr", "4M")
    subprocess.run(["nbdcopy", "-", rd.uri("dberr")], input=os.urandom(4 << 20), check=True,
                   timeout=60)
    rd.call("pair.create", primary="dberr", secondary="dberr-snap", create_secondary=True,
            rate=1)
    rd.call("pair.split", name="dberr-snap")
    rd.stop()
    for f in (rd.data_dir / "pairs" / "dberr-snap").glob("diff.*.bm"):
        f.unlink()
    rd.start()
    if rd.call("pair.show", name="dberr-snap")["state"] != "error":
        pytest.skip("the pair did not come back in error")
    cp = remote(rd, pki, token_file, "--json", "pair", "resync", "dberr-snap", check=False)
    error = json.loads(cp.stdout)["error"]
    assert cp.returncode == 1 and error["code"] == "forbidden", cp.stdout
    assert error["message"].startswith("forbidden: pair 'dberr-snap' is in state error: its "
                                       "resync is a full resync, which needs scope admin"), error
    assert rd.call("pair.show", name="dberr-snap")["state"] == "error"


def test_split_token_group_split_needs_every_pair_in_its_volumes(rd, pki):
    rd.create_volume("db2", "4M")
    rd.call("pair.create", primary="db2", secondary="db2-snap", create_secondary=True,
            group="g1")
    rd.create_volume("other", "4M")
    rd.call("pair.create", primary="other", secondary="db3-snap", create_secondary=True,
            group="g1")
    token_file = make_token(rd, "backup", "split", "db*")
    cp = remote(rd, pki, token_file, "group", "split", "g1", check=False)
    assert cp.returncode == 1 and "pair 'db3-snap' has volume 'other'" in cp.stderr
    assert rd.call("pair.show", name="db2-snap")["state"] != "split"


def test_plaintext_to_the_tls_port_fails(rd):
    with socket.create_connection(("127.0.0.1", rd.admin_port), timeout=10) as s:
        s.sendall(b'{"id": 1, "method": "status"}\n')
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except ConnectionResetError:
            pass
    assert b"result" not in got and b"pid" not in got
    deadline = time.monotonic() + 5
    while "TLS handshake with" not in rd.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "TLS handshake with 127.0.0.1:" in rd.log()
    assert rd.call("status")["pid"] == rd.pid     # and the daemon carries on


def test_untrusted_certificate_and_unreachable(rd, pki):
    token_file = make_token(rd, "monitor", "read")
    cp = remote(rd, pki, token_file, "status", ca=pki["other_ca"], check=False)
    assert cp.returncode == 4
    assert "TLS failed: the certificate of splitd at" in cp.stderr and "not trusted" in cp.stderr
    cp = remote(rd, pki, token_file, "--json", "status", ca=pki["other_ca"], check=False)
    assert json.loads(cp.stdout)["error"]["code"] == "tls"
    closed = f"tcp://127.0.0.1:{free_tcp_port()}"
    cp = remote(rd, pki, token_file, "status", uri=closed, check=False)
    assert cp.returncode == 4 and "cannot reach splitd at" in cp.stderr
    assert "connection refused" in cp.stderr


# -- bounds on what a client without a token can hold --------------------------------------------

def test_connections_without_token_are_bounded_and_time_out(make_daemon, pki):
    from daemon.remote_admin import MAX_UNAUTHENTICATED

    d = remote_daemon(make_daemon, pki, "--handshake-timeout", "2")
    idle = [socket.create_connection(("127.0.0.1", d.admin_port), timeout=10)
            for _ in range(MAX_UNAUTHENTICATED)]
    try:
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", d.admin_port), timeout=5) as extra:
            assert extra.recv(10) == b""            # closed at once
        assert "without a token yet" in d.log()
        started = time.monotonic()
        for s in idle:
            try:
                assert s.recv(10) == b""            # closed by the handshake timeout
            except ConnectionResetError:
                pass
        assert time.monotonic() - started < 5
        assert "sent no token within 2s" in d.log()
    finally:
        for s in idle:
            s.close()
    # Once they are gone, a client with a token gets in.
    token_file = make_token(d, "monitor", "read")
    with client(d, pki, token_file.read_text()) as c:
        assert c.call("status")["pid"] == d.pid


def test_closed_connections_are_forgotten(rd, pki):
    from daemon.remote_admin import MAX_CONNECTIONS

    secret = make_token(rd, "monitor", "read").read_text()
    for _ in range(MAX_CONNECTIONS + 8):
        with client(rd, pki, secret) as c:
            c.call("status")


def test_long_token_line_is_refused(rd, pki):
    with tls_socket(rd, pki) as s:
        s.sendall(b'{"id": 1, "method": "auth", "params": {"token": "' + b"x" * 10000)
        reply = read_reply(s)
        assert reply["error"]["code"] == "unauthorized"
        assert "longer than 4096 bytes" in reply["error"]["message"]


# -- configuration ----------------------------------------------------------------------------------

def test_admin_listen_needs_tls(make_daemon):
    d = make_daemon(["--admin-listen", f"tcp://127.0.0.1:{free_tcp_port()}"], start=False)
    with pytest.raises(DaemonFailed) as e:
        d.start()
    assert e.value.returncode == 2
    assert "the remote admin API is served only with TLS" in str(e.value)


@pytest.mark.parametrize("uri", ["unix:/tmp/admin.sock", "tcp://127.0.0.1"])
def test_admin_listen_must_be_tcp_with_a_port(make_daemon, pki, uri):
    d = make_daemon(["--admin-listen", uri, "--tls-cert", str(pki["cert"]),
                     "--tls-key", str(pki["key"])], start=False)
    with pytest.raises(DaemonFailed) as e:
        d.start()
    assert e.value.returncode == 2 and "--admin-listen" in str(e.value)


def test_admin_listen_in_the_config_file(tmp_path, pki):
    from tests.daemon.test_config import refused, run_splitd

    line = refused(run_splitd(tmp_path, config='admin_listen = "tcp://127.0.0.1:10810"\n'))
    assert (f"{tmp_path / 'splitd.toml'}: admin_listen: the remote admin API is served only "
            "with TLS") in line
    line = refused(run_splitd(tmp_path, config='admin_listen = "backup=tcp://127.0.0.1:1"\n'))
    assert "admin_listen: must be tcp://ADDR:PORT" in line


@pytest.mark.parametrize("args, message", [
    (["--connect", "storage:10810"], "is not a remote admin address: use tcp://HOST:PORT"),
    (["--connect", "tcp://storage"], "needs a host and a port"),
    (["--connect", "tcp://127.0.0.1:1", "--socket", "/tmp/a.sock"], "--socket and --connect"),
    (["--token-file", "/dev/null"], "--token-file and --tls-ca go with --connect"),
    (["--connect", "tcp://127.0.0.1:1", "--token-file", "/nonexistent"],
     "cannot read the token file /nonexistent"),
    (["--connect", "tcp://127.0.0.1:1", "--token-file", "/dev/null"], "the token is empty"),
])
def test_remote_options_refused_before_anything_is_sent(tmp_path, args, message):
    import os
    import subprocess

    from tests.conftest import BIN

    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITD_")}
    cp = subprocess.run([str(BIN / "splitctl"), *args, "status"], capture_output=True, text=True,
                        timeout=30, env=env)
    assert cp.returncode == 2, cp
    assert message in cp.stderr
