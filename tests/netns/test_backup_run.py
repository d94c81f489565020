"""`splitctl backup run --host` end to end across the three hosts (issue 12,
"Tests"): from `backup`, the host agent in `app` prepares the directory
(freeze, split, thaw) while the writer writes, the agent reads the secondary
through the daemon's TLS `backup` port into a store on the backup host;
then the snapshot is restored into a file there (fsck -n clean, every file
completed before the freeze has its checksum) and, through the daemon's
remote admin API, into a new volume, equal to it. A second run after more
writes, with the pair still split from the first (as a nightly job finds
it), resyncs it first and is an incremental of the first; it restores as
exactly.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from harness.site import AGENT_PORT
from harness.splitd import BIN
from harness.writer import records
from tests.agents.backup.helpers import file_digests
from tests.netns import test_backup_prepare as prepare_tests
from tests.netns.test_backup_prepare import (
    SIZE,
    check_image,
    splittable,
    wait_records,
    writer,
)
from tests.pairs.helpers import first_mismatch, image_digests

# The application host of the prepare tests (their fixture `app`, here by
# this name), made again for this module on its own site.
app_fixture = prepare_tests.app


def splitctl_backup(site, *args: str, timeout: float = 300) -> dict:
    cp = site.net.run("backup", [str(BIN / "splitctl"), "--json", "backup", *args], env=site.env,
                      timeout=timeout)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    return json.loads(cp.stdout)


def run_backup(site, app, store: Path, *extra: str) -> dict:
    return splitctl_backup(site, "run", "--host", f"{site.app_addr}:{AGENT_PORT}", "--dir",
                           str(app.data), "--port", "backup", "--to", str(store),
                           "--host-token-file", str(app.token), "--host-tls-ca", str(site.ca), *extra)


def restored_file_checked(site, store: Path, sid: str, tmp: Path, log: Path, name: str,
                          prepared: dict) -> Path:
    """Restore `sid` into a file on the backup host; fsck -n it; mount it
    read-only; check the writer's files there."""
    image = tmp / f"{sid}.img"
    r = splitctl_backup(site, "restore", sid, "--from", str(store), "--to", str(image))
    assert r["digest_checked"] and r["size"] == SIZE, r
    fsck = subprocess.run(["fsck.ext4", "-n", "-f", str(image)], capture_output=True, text=True,
                          timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    mnt = tmp / f"{sid}.mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop,ro", str(image), str(mnt)], check=True,
                   capture_output=True, timeout=60)
    try:
        thawed_by = prepared["frozen_at"] + prepared["window_ms"] / 1000
        check_image(mnt / "data" / name, records(str(log)), prepared["frozen_at"], thawed_by)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)
    return image


@pytest.mark.parametrize("when", ["--wait-copy", "--now"])
def test_backup_run_with_the_host_agent(site, app_fixture, tmp_path, when):
    app = app_fixture
    store = tmp_path / "store"
    splitctl_backup(site, "init", str(store))
    splittable(site)
    with writer(site, app, f"run{when}") as log:
        first = run_backup(site, app, store, when)
        prepared = first["prepare"]
        wait_records(log, prepared["frozen_at"] + prepared["window_ms"] / 1000, 3)
        assert first["pair"] == "db-snap" and first["split_gen"] == prepared["split_gen"], first
        assert first["uri"].startswith("nbds://") and first["connections"] >= 1, first
        image = restored_file_checked(site, store, first["snapshot"], tmp_path, log, f"run{when}",
                                      prepared)

        # File-level restore on the backup host, through the daemon's remote
        # admin API and its TLS port: the manifest's directory and mountpoint
        # place the backed-up directory inside the image.
        admin = site.daemon_token(f"restorer{when}", "admin")
        files = tmp_path / f"files{when}"
        cp = site.splitctl("backup", "--json", "backup", "restore-files", first["snapshot"],
                           f"run{when}", "--from", str(store), "--to", str(files), "--port", "backup",
                           token=admin, timeout=300)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert json.loads(cp.stdout)["in_image"] == "data"
        check_image(files / f"run{when}", records(str(log)), prepared["frozen_at"],
                    prepared["frozen_at"] + prepared["window_ms"] / 1000)
        cp = site.splitctl("backup", "--json", "backup", "files", first["snapshot"], "--from",
                           str(store), "--port", "backup", token=admin, timeout=300)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        listed = {f["path"] for f in json.loads(cp.stdout)["files"]}
        assert {str(p.relative_to(files)) for p in files.rglob("*")} <= listed

        # Into a new volume, through the daemon's remote admin API and TLS port.
        volume = f"db-restored{when.replace('--', '-')}"
        cp = site.splitctl("backup", "--json", "backup", "restore", first["snapshot"], "--from",
                           str(store), "--to-volume", volume, "--create", "--port", "backup",
                           token=admin, timeout=300)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert first_mismatch(file_digests(image), image_digests(site.daemon.uri(volume))) is None

        # More writes, another run, as a nightly job would: the pair is still
        # split from the first. --no-resync refuses it, naming the option; by
        # default the agent resyncs it first (its split token may, controller/
        # access.py) and the run is an incremental of the first.
        wait_records(log, prepared["frozen_at"] + prepared["window_ms"] / 1000, 10)
        cp = site.net.run("backup", [str(BIN / "splitctl"), "--json", "backup", "run", "--host",
                                     f"{site.app_addr}:{AGENT_PORT}", "--dir", str(app.data),
                                     "--port", "backup", "--to", str(store), "--host-token-file",
                                     str(app.token), "--host-tls-ca", str(site.ca), "--no-resync"],
                          env=site.env, timeout=120)
        assert cp.returncode != 0 and "pair-state" in cp.stdout + cp.stderr, cp.stdout + cp.stderr
        assert "add --resync" in cp.stdout + cp.stderr, cp.stdout + cp.stderr
        second = run_backup(site, app, store, when)
        assert second["prepare"]["resynced"] == ["db-snap"], second["prepare"]
        assert second["split_gen"] == first["split_gen"] + 1, (first, second)
        assert second["delta_base"] == first["split_gen"], second
        assert second["mode"] == "incremental" and second["parent"] == first["snapshot"], second
        assert second["bytes_read"] <= second["delta_bytes"], second
        restored_file_checked(site, store, second["snapshot"], tmp_path, log, f"run{when}",
                              second["prepare"])
