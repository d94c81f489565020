"""TLS on NBD listeners (proto.md "TLS support"), with a throw-away CA.

--tls require is FORCEDTLS on TCP (Unix sockets stay plaintext); --tls on is
SELECTIVETLS with every export available either way; --tls-verify-peer asks
clients for a certificate signed by --tls-ca. Clients: nbdinfo, the nbd
module (libnbd, GnuTLS), and the raw client over Python's ssl module.
"""
from __future__ import annotations

import os
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from harness.pki import libnbd_cert_dir, make_ca, make_client_cert, make_server_cert
from tests.conftest import BIN, need
from tests.daemon import rawnbd as r
from tests.daemon.rawnbd import Closed, RawClient

nbd = pytest.importorskip("nbd")

MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for localhost / 127.0.0.1, a client
    certificate (harness/pki.py); plus client directories laid out as libnbd's
    tls-certificates=DIR wants them (ca-cert.pem, client-cert.pem,
    client-key.pem)."""
    need("openssl")
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, cn="splitd test CA")    # tests/agents/test_nbd_uri looks for it
    cert, key = make_server_cert(d)
    make_client_cert(d)
    with_cert = libnbd_cert_dir(d / "client", ca)
    without_cert = libnbd_cert_dir(d / "client-anonymous", ca)
    for name in ("client-cert.pem", "client-key.pem"):
        (with_cert / name).write_bytes((d / name).read_bytes())
    os.chmod(with_cert / "client-key.pem", 0o600)
    return {"dir": d, "client": with_cert, "anonymous": without_cert,
            "server_args": ["--tls-cert", str(cert), "--tls-key", str(key),
                            "--tls-ca", str(ca)]}


def tls_daemon(make_daemon, pki, mode: str, *extra: str):
    d = make_daemon(["--tls", mode, *pki["server_args"], *extra])
    d.create_volume("vol", 16 * MiB)
    return d


def nbdinfo(uri: str) -> subprocess.CompletedProcess:
    need("nbdinfo")
    return subprocess.run(["nbdinfo", uri], capture_output=True, text=True, timeout=30)


def nbds_uri(d, certs: Path) -> str:
    return f"nbds://127.0.0.1:{d.tcp_port}/vol?tls-certificates={certs}"


def tls_handle(d, certs: Path):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(certs))
    h.set_export_name("vol")
    h.connect_tcp("127.0.0.1", str(d.tcp_port))
    return h


def check_data_over(h) -> None:
    """Small and large writes and reads; large reads are the ones a server
    might send by a path that skips the TLS layer."""
    blocks = {0: os.urandom(4096), 65536: os.urandom(MiB), 3 * MiB: os.urandom(4 * MiB)}
    for off, data in blocks.items():
        h.pwrite(data, off)
    h.flush()
    for off, data in blocks.items():
        assert h.pread(len(data), off) == data
    assert h.pread(512, 10 * MiB) == bytes(512)


def raw_starttls(cl: RawClient, pki) -> None:
    """NBD_OPT_STARTTLS, then the TLS handshake on the same socket."""
    [rep] = cl.option(r.OPT_STARTTLS)
    assert rep.type == r.REP_ACK, rep
    ctx = ssl.create_default_context(cafile=str(pki["dir"] / "ca-cert.pem"))
    ctx.load_cert_chain(str(pki["dir"] / "client-cert.pem"), str(pki["dir"] / "client-key.pem"))
    timeout = cl.sock.gettimeout()
    cl.sock = ctx.wrap_socket(cl.sock, server_hostname="localhost")
    cl.sock.settimeout(timeout)


# -- --tls require ------------------------------------------------------------------------

def test_require_serves_tls_clients(make_daemon, pki):
    d = tls_daemon(make_daemon, pki, "require")
    cp = nbdinfo(nbds_uri(d, pki["client"]))
    assert cp.returncode == 0, cp.stderr
    assert "with TLS" in cp.stdout
    h = tls_handle(d, pki["client"])
    try:
        assert h.get_size() == 16 * MiB
        check_data_over(h)
    finally:
        h.shutdown()


def test_require_refuses_plaintext_tcp_but_not_the_unix_socket(make_daemon, pki):
    d = tls_daemon(make_daemon, pki, "require")
    cp = nbdinfo(f"nbd://127.0.0.1:{d.tcp_port}/vol")
    assert cp.returncode != 0, cp.stdout
    cp = nbdinfo(d.uri("vol"))
    assert cp.returncode == 0, cp.stderr
    assert "without TLS" in cp.stdout


def test_require_is_forcedtls_on_the_wire(make_daemon, pki):
    d = tls_daemon(make_daemon, pki, "require")
    with RawClient.tcp(d.tcp_port) as cl:
        cl.start()
        # "FORCEDTLS mode": any option but STARTTLS and ABORT, known or not,
        # "MUST reply with NBD_REP_ERR_TLS_REQD if TLS has not been initiated".
        for opt, data in ((r.OPT_LIST, b""), (r.OPT_INFO, r.info_data("vol")),
                          (r.OPT_GO, r.info_data("vol")), (r.OPT_STRUCTURED_REPLY, b""),
                          (0x7777, b"")):
            [rep] = cl.option(opt, data)
            assert rep.type == r.REP_ERR_TLS_REQD, (opt, rep)
        raw_starttls(cl, pki)
        # "The server MUST NOT send NBD_REP_ERR_TLS_REQD in reply to any option
        # if TLS has already been initiated", and a second STARTTLS is invalid.
        [rep] = cl.option(r.OPT_STARTTLS)
        assert rep.type == r.REP_ERR_INVALID
        [rep] = cl.option(0x7777)
        assert rep.type == r.REP_ERR_UNSUP
        cl.negotiate_structured()
        cl.go("vol")
        payload = os.urandom(512 * 1024)
        assert cl.write(0, payload, cookie=1) == 0
        assert cl.read(0, len(payload), cookie=2) == payload
    with RawClient.tcp(d.tcp_port) as cl:
        cl.start()
        # EXPORT_NAME cannot be refused with an error: "it MUST terminate the session".
        cl.send_option(r.OPT_EXPORT_NAME, b"vol")
        cl.wait_closed(5)


def test_starttls_forgets_what_was_negotiated_before(make_daemon, pki):
    d = tls_daemon(make_daemon, pki, "on")
    with RawClient.tcp(d.tcp_port) as cl:
        cl.start()
        cl.negotiate_structured()
        raw_starttls(cl, pki)
        # NBD_OPT_STARTTLS: "the server MUST NOT preserve any negotiation state
        # (such as a request for NBD_OPT_STRUCTURED_REPLY ...)". So structured
        # replies are off again: SET_META_CONTEXT is invalid and a read gets a
        # simple reply.
        replies = cl.option(r.OPT_SET_META_CONTEXT, r.meta_data("vol", ("base:allocation",)))
        assert [x.type for x in replies] == [r.REP_ERR_INVALID]
        cl.go("vol")
        cl.send_request(r.CMD_READ, 0, 512, cookie=5)
        rep = cl.reply(512)
        assert not rep.structured and rep.cookie == 5 and rep.payload == bytes(512)


# -- --tls on ----------------------------------------------------------------------------------

def test_on_accepts_tls_and_plaintext(make_daemon, pki):
    d = tls_daemon(make_daemon, pki, "on")
    cp = nbdinfo(nbds_uri(d, pki["client"]))
    assert cp.returncode == 0, cp.stderr
    assert "with TLS" in cp.stdout
    cp = nbdinfo(f"nbd://127.0.0.1:{d.tcp_port}/vol")
    assert cp.returncode == 0, cp.stderr
    assert "without TLS" in cp.stdout
    h = tls_handle(d, pki["client"])
    try:
        check_data_over(h)
    finally:
        h.shutdown()
    plain = nbd.NBD()
    plain.connect_uri(f"nbd://127.0.0.1:{d.tcp_port}/vol")
    try:
        assert plain.pread(4096, 0) == first_block_via_unix(d)
    finally:
        plain.shutdown()


def first_block_via_unix(d) -> bytes:
    """The first 4 KiB of vol, read over the Unix socket."""
    h = nbd.NBD()
    h.connect_uri(d.uri("vol"))
    try:
        return h.pread(4096, 0)
    finally:
        h.shutdown()


# -- --tls-verify-peer ------------------------------------------------------------------------

def test_verify_peer_refuses_a_client_without_certificate(make_daemon, pki):
    # Control: without --tls-verify-peer the same certificate-less client is served.
    d = tls_daemon(make_daemon, pki, "require")
    cp = nbdinfo(nbds_uri(d, pki["anonymous"]))
    assert cp.returncode == 0, cp.stderr
    d.stop()

    d = tls_daemon(make_daemon, pki, "require", "--tls-verify-peer")
    cp = nbdinfo(nbds_uri(d, pki["anonymous"]))
    assert cp.returncode != 0, cp.stdout
    with pytest.raises(nbd.Error):
        h = tls_handle(d, pki["anonymous"])
        h.pread(512, 0)                 # TLS 1.3 may report the refusal only here
    cp = nbdinfo(nbds_uri(d, pki["client"]))
    assert cp.returncode == 0, cp.stderr
    h = tls_handle(d, pki["client"])
    try:
        check_data_over(h)
    finally:
        h.shutdown()


# -- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--tls", "require"], "--tls-cert"),
    (["--tls", "on", "--tls-key", "/nonexistent/key.pem"], "--tls-cert"),
    (["--tls", "require", "--tls-cert", "/nonexistent/cert.pem",
      "--tls-key", "/nonexistent/key.pem"], "/nonexistent/cert.pem"),
    (["--tls", "require", "--tls-verify-peer", "SERVER_CERT_AND_KEY"], "--tls-ca"),
], ids=["no-cert", "no-cert-on", "missing-file", "verify-without-ca"])
def test_bad_tls_configuration_is_one_line_and_exit_2(tmp_path, pki, args, words):
    if args[-1] == "SERVER_CERT_AND_KEY":
        args = args[:-1] + pki["server_args"][:4]
    cp = subprocess.run([str(BIN / "splitd"), "--config", "/dev/null",
                         "--data-dir", str(tmp_path / "data"),
                         "--admin-socket", str(tmp_path / "admin.sock"),
                         "--listen", f"unix:{tmp_path}/nbd.sock", *args],
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 2, cp.stderr
    lines = cp.stderr.splitlines()
    assert len(lines) == 1, cp.stderr
    assert words in lines[0]
    assert cp.stdout == ""


# -- the handshake timeout covers TLS too ---------------------------------------------------------

def test_stalled_tls_handshakes_are_disconnected(make_daemon, pki):
    d = tls_daemon(make_daemon, pki, "require", "--handshake-timeout", "1")
    with RawClient.tcp(d.tcp_port) as mute, RawClient.tcp(d.tcp_port) as idle:
        # Gets the STARTTLS ACK, then never says ClientHello.
        mute.start()
        [rep] = mute.option(r.OPT_STARTTLS)
        assert rep.type == r.REP_ACK
        # Finishes TLS, then never sends another option.
        idle.start()
        raw_starttls(idle, pki)
        for cl in (mute, idle):
            took = cl.wait_closed(6)
            assert took <= 4, f"closed only after {took:.1f}s"
    # Meanwhile a prompt client is served.
    cp = nbdinfo(nbds_uri(d, pki["client"]))
    assert cp.returncode == 0, cp.stderr


def test_clients_dropped_during_tls_upgrade_free_their_slot(make_daemon, pki):
    # Clients that send STARTTLS and then never start the TLS handshake are
    # dropped by the handshake timeout. Each must give its connection slot
    # back; otherwise a few such clients fill --max-connections for good (and
    # a stop waits out the whole grace period for connections long gone).
    cap = 8
    d = tls_daemon(make_daemon, pki, "require", "--handshake-timeout", "1",
                   "--max-connections", str(cap), "--shutdown-grace", "3")
    for _ in range(3):
        mutes = []
        for _ in range(cap):
            cl = RawClient.tcp(d.tcp_port)
            try:
                cl.start()
            except Closed:              # refused: slots already lost; checked below
                cl.close()
                break
            [rep] = cl.option(r.OPT_STARTTLS)
            assert rep.type == r.REP_ACK
            mutes.append(cl)
        for cl in mutes:
            cl.wait_closed(6)
            cl.close()
    time.sleep(0.3)
    # Every slot is free again: a burst of `cap` new clients all get a greeting.
    # (All within the 1 s handshake timeout, which would free slots by itself.)
    burst = [RawClient.tcp(d.tcp_port, timeout=2) for _ in range(cap)]
    greeted = 0
    try:
        for cl in burst:              # all kept open while counting
            try:
                cl.greeting()
                greeted += 1
            except Closed:
                pass
    finally:
        for cl in burst:
            cl.close()
    assert greeted == cap, f"only {greeted} of {cap} slots are free after the mute clients left"
    started = time.monotonic()
    assert d.stop() == 0
    took = time.monotonic() - started
    assert took < 2, f"stop took {took:.1f}s: it waited for connections that are gone"
