"""Ports across hosts: from the backup host (its own network namespace), the
remote admin API locates the split secondary through the daemon's `backup`
port, and libnbd reads it there over TLS; plaintext is refused, and the
`app` port, bound to the interface facing the application host, cannot be
reached from the backup host at all. No host agent involved."""
from __future__ import annotations

import errno
import hashlib
import json
import os

import pytest

from harness.site import APP_PORT, BACKUP_PORT

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture(scope="module")
def split_image(site, tmp_path_factory):
    """Volume p with random data, paired with s and split: sha256 of the image."""
    d = site.daemon
    d.call("volume.create", name="p", size=SIZE)
    image = tmp_path_factory.mktemp("image") / "p.raw"
    with open(image, "wb") as f:
        f.truncate(SIZE)
        f.seek(3 * MiB)
        f.write(os.urandom(5 * MiB))
    site.net.run("storage", ["nbdcopy", str(image), d.uri("p")], check=True)
    d.call("pair.create", primary="p", secondary="s", create_secondary=True)
    with d.admin() as a:
        a.wait_pair("s", "synced", timeout=50, interval=0.1)
    d.call("pair.split", name="s")
    return hashlib.sha256(image.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reader(site):
    return site.daemon_token("backup-reader", "read")


def locate(site, reader) -> dict:
    cp = site.splitctl("backup", "--json", "locate", "s", "--port", "backup", token=reader)
    assert cp.returncode == 0, cp.stderr
    return json.loads(cp.stdout)


def test_locate_from_the_backup_host(site, split_image, reader):
    found = locate(site, reader)
    assert found["uri"] == f"nbds://{site.storage_backup}:{BACKUP_PORT}/s"
    assert found["state"] == "split"
    ports = json.loads(site.splitctl("backup", "--json", "port", "list", token=reader).stdout)
    by_name = {p["name"]: p for p in ports["ports"]}
    assert by_name["backup"]["bound"] == [f"{site.storage_backup}:{BACKUP_PORT}"]
    # Every address of the interface facing the app host: data and management.
    assert by_name["app"]["bound"] == [f"{site.storage_app}:{APP_PORT}",
                                       f"{site.admin_host}:{APP_PORT}"]
    assert (by_name["backup"]["tls"], by_name["app"]["tls"]) == ("require", "off")


def test_libnbd_reads_the_secondary_over_tls(site, split_image, reader, tmp_path):
    uri = site.tls_uri(locate(site, reader)["uri"])
    info = site.net.run("backup", ["nbdinfo", "--json", uri], check=True)
    assert json.loads(info.stdout)["exports"][0]["export-size"] == SIZE
    out = tmp_path / "s.raw"
    site.net.run("backup", ["nbdcopy", uri, str(out)], check=True)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == split_image


def test_plaintext_to_the_backup_port_is_refused(site, split_image, reader):
    plain = locate(site, reader)["uri"].replace("nbds://", "nbd://", 1)
    # libnbd says "Operation not supported" for NBD_REP_ERR_TLS_REQD; its
    # debug log has the daemon's own message.
    cp = site.net.run("backup", ["nbdinfo", plain], env=dict(os.environ, LIBNBD_DEBUG="1"))
    assert cp.returncode != 0
    assert "server error message: TLS is required on this listener" in cp.stderr, cp.stderr
    assert "NBD_CMD_READ" not in cp.stderr


def test_wrong_ca_is_refused(site, split_image, reader, tmp_path):
    from harness.pki import libnbd_cert_dir, make_ca

    other = libnbd_cert_dir(tmp_path / "other", make_ca(tmp_path, "other-ca"))
    uri = locate(site, reader)["uri"] + f"?tls-certificates={other}"
    cp = site.net.run("backup", ["nbdinfo", uri])
    assert cp.returncode != 0 and "certificate" in cp.stderr.lower(), cp.stderr


def connect_from_backup(site, host: str, port: int) -> int:
    """errno of a TCP connect from the backup host (0: connected)."""
    code = ("import socket, sys\n"
            "s = socket.socket(); s.settimeout(5)\n"
            "sys.exit(s.connect_ex((sys.argv[1], int(sys.argv[2]))))\n")
    return site.net.run("backup", ["python3", "-c", code, host, str(port)]).returncode


def test_app_port_is_unreachable_from_the_backup_host(site):
    # The app link is not routed from the backup host...
    assert connect_from_backup(site, site.storage_app, APP_PORT) == errno.ENETUNREACH
    # ...and on the address it does reach, only the backup port listens.
    assert connect_from_backup(site, site.storage_backup, APP_PORT) == errno.ECONNREFUSED
    assert connect_from_backup(site, site.storage_backup, BACKUP_PORT) == 0


def test_daemon_tokens_from_the_backup_host(site, split_image, reader):
    """The daemon's remote admin API, from the backup host: a read token
    locates but does not split; a split token for other volumes, a revoked
    or a wrong one are refused, each in one line with its code."""
    def refused(token, *args: str) -> dict:
        cp = site.splitctl("backup", "--json", *args, token=token)
        assert cp.returncode == 1 and cp.stderr.count("\n") == 1, cp.stderr
        return json.loads(cp.stdout)["error"]

    site.daemon.call("pair.resync", name="s")
    assert refused(reader, "pair", "split", "s")["code"] == "forbidden"
    other = site.daemon_token("other-volumes", "split", "web*")
    assert refused(other, "pair", "split", "s")["code"] == "forbidden"
    revoked = site.daemon_token("revoked", "split", "*")
    site.splitctl_local("token", "revoke", "revoked")
    assert refused(revoked, "pair", "split", "s")["code"] == "unauthorized"
    wrong = site.base / "wrong.token"
    wrong.write_text("x" * 43 + "\n")
    assert refused(wrong, "locate", "s", "--port", "backup")["code"] == "unauthorized"
    assert site.daemon.call("pair.show", name="s")["state"] in ("resync", "pair")   # not split
    good = site.daemon_token("splitter", "split", "*")
    cp = site.splitctl("backup", "--json", "pair", "split", "s", token=good)
    assert cp.returncode == 0 and json.loads(cp.stdout)["state"] == "split", cp.stderr
