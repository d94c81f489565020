"""splitd-host attach / list / detach against the real daemon: nbdfuse +
loop (this machine has no nbd module, so the nbd-client path is not run)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.root


def _loops_backed_by(path: str) -> list[str]:
    cp = subprocess.run(["losetup", "-j", path], capture_output=True, text=True, timeout=30)
    return cp.stdout.splitlines()


def test_attach_list_detach_round_trip(host, daemon, tmp_path):
    daemon.create_volume("v", "64M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _, att, _ = host.json("attach", "v", "--daemon", daemon.admin_socket,
                          "--nbd", daemon.uri("v"))
    assert att["device"].startswith("/dev/loop") and att["volume"] == "v", att
    assert att["method"] == "nbdfuse+loop" and att["nbd_uri"] == daemon.uri("v")
    subprocess.run(["mkfs.ext4", "-q", att["device"]], check=True, capture_output=True,
                   timeout=60)
    host.run("detach", att["device"])
    assert host.json("list")[1] == {"attachments": []}
    assert not _loops_backed_by(os.path.join(att["fuse_dir"], "nbd"))
    assert not os.path.exists(att["fuse_dir"])

    _, att, _ = host.json("attach", "v", "--daemon", daemon.admin_socket,
                          "--nbd", daemon.uri("v"), "--mount", mnt)
    assert att["mountpoint"] == str(mnt)
    (mnt / "hello").write_text("hello")
    _, listed, _ = host.json("list")
    [row] = listed["attachments"]
    assert row["alive"] and row["mounted"] and row["device"] == att["device"], row
    text = host.run("list").stdout
    assert att["device"] in text and "alive" in text, text

    # Busy: a process has a file open there; detach refuses and names it.
    with open(mnt / "hello") as held:
        rc, err, stderr = host.json("detach", str(mnt), check=False)
        assert rc == 1 and err["error"]["code"] == "busy", err
        assert str(mnt) in err["error"]["message"] and "busy" in stderr, stderr
        assert os.path.ismount(mnt)
        assert held.read() == "hello"
    host.run("detach", "v")         # by volume name
    assert not os.path.ismount(mnt)
    assert host.json("list")[1] == {"attachments": []}
    assert not _loops_backed_by(os.path.join(att["fuse_dir"], "nbd"))

    # What was written went to the volume: attach again by port, read it back.
    daemon.call("pair.create", primary="v", secondary="v2", create_secondary=True)
    host.run("attach", "v", "--daemon", daemon.admin_socket, "--port", "unix", "--mount", mnt)
    assert (mnt / "hello").read_text() == "hello"
    host.run("detach", str(mnt))    # by mount point


def test_list_shows_a_broken_attachment(host, daemon, tmp_path):
    daemon.create_volume("v", "64M")
    _, att, _ = host.json("attach", "v", "--daemon", daemon.admin_socket,
                          "--nbd", daemon.uri("v"))
    subprocess.run(["losetup", "-d", att["device"]], check=True, timeout=30)
    _, listed, _ = host.json("list")
    [row] = listed["attachments"]
    assert not row["alive"] and not row["device_ok"] and row["nbdfuse_ok"], row
    assert "BROKEN: device gone" in host.run("list").stdout
    host.run("detach", "v")
    assert host.json("list")[1] == {"attachments": []}


def test_attach_refusals(host, daemon, tmp_path):
    daemon.create_volume("v", "64M")
    rc, err, _ = host.json("attach", "v", "--daemon", daemon.admin_socket, "--port", "nope",
                           check=False)
    assert rc == 1 and err["error"]["code"] == "daemon", err
    rc, err, _ = host.json("attach", "v", "--daemon", "tcp://127.0.0.1:1", "--port", "unix",
                           check=False)
    assert rc == 2 and "token" in err["error"]["message"], err
    rc, err, _ = host.json("attach", "nosuch", "--daemon", daemon.admin_socket,
                           "--nbd", daemon.uri("nosuch"), check=False)
    assert rc == 1 and "nbdfuse could not open" in err["error"]["message"], err
    assert host.json("list")[1] == {"attachments": []}
    assert not list(Path(host.state_dir, "fuse").iterdir())
