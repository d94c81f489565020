"""prepare against a remote daemon: the attachment names tcp://HOST:PORT, a
token file and a CA; the admin API is reached over TLS with the token
(daemon/remote_admin.py), checked before anything is frozen."""
from __future__ import annotations

import subprocess

import pytest

from tests.agents.host.conftest import journal, writable
from tests.conftest import need
from tests.daemon.pki import make_ca, make_server_cert
from tests.daemon.test_remote_admin import make_token, remote_daemon

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    need("openssl")
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    cert, key = make_server_cert(d)
    return {"ca": ca, "cert": cert, "key": key, "other_ca": make_ca(d, "other-ca")}


def test_prepare_through_the_remote_admin_api(host, make_daemon, pki, tmp_path):
    d = remote_daemon(make_daemon, pki)
    d.create_volume("p", "64M")
    d.call("pair.create", primary="p", secondary="s", create_secondary=True)
    token = make_token(d, "host", "split", "[ps]")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    remote = ["--daemon", d.admin_uri, "--token-file", token, "--tls-ca", pki["ca"]]
    _, att, _ = host.json("attach", "p", *remote, "--port", "unix")
    assert att["token_file"] == str(token) and att["tls_ca"] == str(pki["ca"]), att
    subprocess.run(["mkfs.ext4", "-q", att["device"]], check=True, capture_output=True,
                   timeout=60)
    host.run("detach", "p")
    host.run("attach", "p", *remote, "--port", "unix", "--mount", mnt)

    _, answer, _ = host.json("prepare", mnt, "--port", "unix")
    assert answer["pair"] == "s" and answer["uri"] == d.uri("s"), answer
    # The next one: the split token resyncs its pair first (a normal resync).
    _, again, _ = host.json("prepare", mnt, "--port", "unix", "--resync")
    assert again["resynced"] == ["s"] and again["split_gen"] == answer["split_gen"] + 1, again
    assert again["delta_base"] == answer["split_gen"], again
    d.call("pair.resync", name="s")

    # Out of scope: a read token, then a split token for other volumes, then
    # a revoked token. Each refused before the freeze.
    for name, scope, volumes, words in (("ro", "read", None, "has scope read"),
                                        ("other", "split", "db*", "matching 'db*'")):
        token.write_text(make_token(d, name, scope, volumes).read_text())
        rc, err, _ = host.json("prepare", mnt, "--port", "unix", check=False)
        assert rc == 1 and err["error"]["code"] == "daemon-refused", err
        assert words in err["error"]["message"] and "nothing was frozen" in err["error"]["message"]
    d.splitctl("token", "revoke", "other")
    rc, err, _ = host.json("prepare", mnt, "--port", "unix", check=False)
    assert rc == 1 and err["error"]["code"] == "daemon-refused", err
    assert "unauthorized" in err["error"]["message"], err
    # A CA that did not sign the daemon's certificate: unreachable (exit 4).
    att_file = next((host.state_dir / "attachments").glob("*.json"))
    att_file.write_text(att_file.read_text().replace(str(pki["ca"]), str(pki["other_ca"])))
    rc, err, _ = host.json("prepare", mnt, "--port", "unix", check=False)
    assert rc == 4 and err["error"]["code"] == "daemon-unreachable", err
    assert "not trusted" in err["error"]["message"], err
    assert writable(mnt)
    assert not journal(host)
