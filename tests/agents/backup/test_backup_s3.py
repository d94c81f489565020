"""splitctl backup against an S3 store (a real SeaweedFS on 127.0.0.1): run
--volume, list/show/verify/check, restore to a file and into a new volume,
byte-exact; a second run stores nothing new; prune with gc. The S3 server
killed mid-backup: a clear one-line error, no snapshot committed, the next
run completes. Access denied and a missing bucket, as the CLI reports them."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from harness.splitd import BIN
from tests.agents.backup.helpers import MiB, backup, backup_fails, first_mismatch, image_digests, write_blocks
from tests.conftest import need

pytest.importorskip("nbd")

SIZE = 64 * MiB


def _volume(daemon, size: int = SIZE) -> str:
    daemon.create_volume("v", size)
    write_blocks(daemon, "v", [0], seed=1, length=3 * MiB)
    write_blocks(daemon, "v", [17 * MiB + 8192], seed=2)
    write_blocks(daemon, "v", [size - MiB], seed=3, length=MiB)
    return "v"


def test_volume_backup_and_restore_on_s3(daemon, s3_env, tmp_path):
    need("nbdcopy", "cmp")
    volume = _volume(daemon)
    store = f"s3://{s3_env}/backups/one"
    made = backup(daemon, "init", store)
    assert made["store"] == store
    r = backup(daemon, "run", "--volume", daemon.uri(volume), "--to", store)
    assert r["mode"] == "full" and r["new_bytes"] == 3 * 4 * MiB, r
    assert [m["id"] for m in backup(daemon, "list", "--store", store)["snapshots"]] == [r["snapshot"]]
    shown = backup(daemon, "show", r["snapshot"], "--store", store)
    assert shown["sizes"]["logical"] == SIZE, shown
    assert backup(daemon, "verify", r["snapshot"], "--store", store)["ok"]
    assert backup(daemon, "check", "--store", store)["ok"]

    original = tmp_path / "original.img"
    subprocess.run(["nbdcopy", daemon.uri(volume), str(original)], check=True, timeout=60)
    out = tmp_path / "restored.img"
    res = backup(daemon, "restore", r["snapshot"], "--from", store, "--to", str(out))
    assert res["digest_checked"], res
    subprocess.run(["cmp", str(original), str(out)], check=True)
    res = backup(daemon, "restore", r["snapshot"], "--from", store, "--to-volume", "r", "--create")
    assert res["digest_checked"], res
    assert first_mismatch(image_digests(daemon.uri(volume)), image_digests(daemon.uri("r"))) is None

    again = backup(daemon, "run", "--volume", daemon.uri(volume), "--to", store)
    assert again["new_bytes"] == 0, again
    write_blocks(daemon, "v", [40 * MiB], seed=4, length=MiB)
    third = backup(daemon, "run", "--volume", daemon.uri(volume), "--to", store)
    assert third["new_bytes"] == 4 * MiB, third
    pruned = backup(daemon, "prune", "--store", store, "--keep-last", "1")
    assert sorted(pruned["remove"]) == sorted([r["snapshot"], again["snapshot"]]), pruned
    assert backup(daemon, "check", "--store", store)["ok"]
    res = backup(daemon, "restore", third["snapshot"], "--from", store, "--to-volume", "r3", "--create")
    assert first_mismatch(image_digests(daemon.uri(volume)), image_digests(daemon.uri("r3"))) is None


def test_serve_a_snapshot_from_s3(s3_env, daemon, tmp_path):
    """The daemon (started after s3_env: the AWS environment is its own too)
    serves a snapshot straight from the S3 store; every byte equals the volume."""
    need("nbdcopy", "cmp")
    volume = _volume(daemon)
    store = f"s3://{s3_env}/served"
    backup(daemon, "init", store, "--chunk-size", "1M")
    sid = backup(daemon, "run", "--volume", daemon.uri(volume), "--to", store)["snapshot"]
    r = backup(daemon, "serve", sid, "--from", store, "--as", "snap")
    assert r["size"] == SIZE and r["read_only"], r
    original, served = tmp_path / "v.img", tmp_path / "served.img"
    subprocess.run(["nbdcopy", daemon.uri(volume), str(original)], check=True, timeout=60)
    subprocess.run(["nbdcopy", daemon.uri("snap"), str(served)], check=True, timeout=60)
    subprocess.run(["cmp", str(original), str(served)], check=True)
    assert backup(daemon, "unserve", "snap")["unserved"] is True


def test_access_denied_and_missing_bucket(daemon, s3_env, monkeypatch):
    from harness.seaweedfs import READER
    store = f"s3://{s3_env}/denied"
    backup(daemon, "init", store)
    code, err, stderr = backup_fails(daemon, "list", "--store", f"s3://nobucket-{os.getpid()}/x")
    assert err["message"].startswith(f"no bucket 'nobucket-{os.getpid()}' at S3 endpoint"), err
    assert stderr.count("\n") == 1, stderr
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    code, err, stderr = backup_fails(daemon, "list", "--store", store)
    assert code == 1 and err["message"].startswith(f"wrong S3 secret access key for key id {READER[0]}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER[1])
    assert backup(daemon, "list", "--store", store)["snapshots"] == []       # may read
    daemon.create_volume("v", 8 * MiB)
    write_blocks(daemon, "v", [0], seed=5)
    code, err, stderr = backup_fails(daemon, "run", "--volume", daemon.uri("v"), "--to", store)
    assert code == 1 and err["message"].startswith("access denied: PUT leases/"), err
    assert stderr.count("\n") == 1, stderr


@pytest.mark.slow
def test_s3_server_killed_mid_backup(daemon, own_seaweed):
    size = 192 * MiB
    daemon.create_volume("v", size)
    write_blocks(daemon, "v", list(range(0, size, 16 * MiB)), seed=7, length=16 * MiB)
    own_seaweed.create_bucket("killed")
    store = "s3://killed/s"
    backup(daemon, "init", store)
    s3 = own_seaweed.client()
    env = dict(os.environ, SPLITD_ADMIN_SOCKET=str(daemon.admin_socket))
    proc = subprocess.Popen([str(BIN / "splitctl"), "backup", "run", "--volume", daemon.uri("v"),
                             "--to", store, "--connections", "1", "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while s3.list_objects_v2(Bucket="killed", Prefix="s/chunks/").get("KeyCount", 0) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        own_seaweed.kill()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, (out, err)
    message = json.loads(out)["error"]["message"]
    assert message.startswith(f"cannot reach S3 endpoint {own_seaweed.endpoint}"), message
    assert err.count("\n") == 1, err
    own_seaweed.start()
    assert backup(daemon, "list", "--store", store)["snapshots"] == []
    r = backup(daemon, "run", "--volume", daemon.uri("v"), "--to", store)
    assert r["new_bytes"] < size, r         # the chunks stored before the kill were reused
    assert backup(daemon, "check", "--store", store)["ok"]
    res = backup(daemon, "restore", r["snapshot"], "--from", store, "--to-volume", "r", "--create")
    assert res["digest_checked"], res
    assert first_mismatch(image_digests(daemon.uri("v")), image_digests(daemon.uri("r"))) is None
