"""`splitd-host attach --port NAME` on a port that requires TLS, with a
private CA: nbdfuse cannot take the CA itself (it refuses a URI's
tls-certificates=), so --tls-certificates DIR runs it through nbdkit's nbd
plugin. From the backup host, through the daemon's `backup` port
(?tls=require) and its remote admin API: attach, write through the loop
device, detach, and read the same bytes back through the daemon. Without
--tls-certificates, a one-line refusal naming the option: libnbd 1.14 given
no CA falls back to the system's and then checks nothing (nbdfuse would
attach to whoever answers)."""
from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest

from tests.agents.host.conftest import Host
from tests.conftest import need

MiB = 1 << 20


@pytest.fixture
def attacher(site, tmp_path):
    need("nbdfuse", "nbdkit", "fusermount3", "losetup")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    volume = f"tlsatt-{uuid.uuid4().hex[:8]}"
    site.daemon.call("volume.create", name=volume, size=8 * MiB)
    token = site.daemon_token(f"reader-{volume}", "read")
    state = tmp_path / "agent"
    host = Host(state)

    def attach(*extra: str) -> subprocess.CompletedProcess:
        return site.agent("backup", state, "--json", "attach", volume, "--daemon",
                          site.admin_uri("backup"), "--token-file", token, "--tls-ca", site.ca,
                          "--port", "backup", *extra, check=False, timeout=120)

    try:
        yield volume, state, attach
    finally:
        host.cleanup()
        site.daemon.call("volume.delete", name=volume)


def test_attach_through_a_tls_port_with_a_private_ca(site, attacher, tmp_path):
    volume, state, attach = attacher
    cp = attach("--tls-certificates", str(site.nbd_certs))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    att = json.loads(cp.stdout)
    assert att["nbd_uri"].startswith("nbds://"), att
    assert att["tls_certificates"] == str(site.nbd_certs)
    data = os.urandom(MiB)
    with open(att["device"], "r+b") as f:
        f.seek(MiB)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    site.agent("backup", state, "detach", volume)
    copy = tmp_path / "copy.raw"
    subprocess.run(["nbdcopy", site.daemon.uri(volume), str(copy)], check=True,
                   capture_output=True, timeout=60)
    image = copy.read_bytes()
    assert image[MiB:2 * MiB] == data
    assert image[:MiB] == bytes(MiB)


def test_attach_through_a_tls_port_without_the_ca_names_the_option(site, attacher):
    volume, state, attach = attacher
    # libnbd 1.14 given no CA does not check the server's certificate at
    # all (nbdfuse would attach to anyone answering): refused before.
    cp = attach()
    assert cp.returncode == 2, cp.stdout
    error = json.loads(cp.stdout)["error"]
    assert error["message"].startswith("nbds://"), error
    assert "needs TLS" in error["message"] and "--tls-certificates DIR" in error["message"]
    assert not list((state / "attachments").glob("*.json"))
    cp = attach("--tls-certificates", "/nonexistent-certs")
    assert cp.returncode == 2
    assert "--tls-certificates /nonexistent-certs has no ca-cert.pem" in cp.stdout
