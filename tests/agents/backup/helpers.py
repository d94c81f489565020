"""What the backup agent's tests share: splitctl backup with --json against
the test daemon, writes through libnbd, and an export's bytes per MiB."""
from __future__ import annotations

import json
import random
from pathlib import Path

from tests.pairs.helpers import MiB, first_mismatch, image_digests, wait_mirrored

__all__ = ["MiB", "backup", "backup_fails", "check_restores", "file_digests", "first_mismatch",
           "image_digests", "resplit", "write_blocks"]


def backup(daemon, *args: str) -> dict:
    """`splitctl backup ARGS --json` (the daemon's admin socket in the
    environment); its JSON answer."""
    cp = daemon.splitctl("backup", *args, "--json")
    return json.loads(cp.stdout)


def backup_fails(daemon, *args: str) -> tuple[int, dict, str]:
    """A `splitctl backup` that must fail: (exit status, its JSON error, stderr)."""
    cp = daemon.splitctl("backup", *args, "--json", check=False)
    assert cp.returncode != 0, f"splitctl backup {' '.join(args)} succeeded: {cp.stdout}"
    return cp.returncode, json.loads(cp.stdout)["error"], cp.stderr


def write_blocks(daemon, volume: str, offsets: list[int], seed: int, length: int = 4096) -> None:
    """Random `length`-byte blocks at `offsets` of `volume`, through libnbd."""
    import nbd
    rnd = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(daemon.uri(volume))
    try:
        for off in offsets:
            h.pwrite(rnd.randbytes(length), off)
        h.flush()
    finally:
        h.shutdown()


def resplit(daemon, pair: str) -> dict:
    """Resync `pair` until it mirrors, then split it; its pair.show."""
    daemon.call("pair.resync", name=pair)
    wait_mirrored(daemon, pair)
    daemon.call("pair.split", name=pair)
    return daemon.call("pair.show", name=pair)


def file_digests(path: Path) -> list[bytes]:
    import hashlib
    out = []
    with open(path, "rb") as f:
        while data := f.read(MiB):
            out.append(hashlib.sha256(data).digest())
    return out


def check_restores(daemon, store: Path, tmp: Path, expected: dict[str, list[bytes]]) -> None:
    """Every snapshot in `expected` restores (to a file) to exactly its image."""
    for sid, digests in expected.items():
        out = tmp / f"restore-{sid}.img"
        backup(daemon, "restore", sid, "--from", str(store), "--to", str(out))
        mismatch = first_mismatch(digests, file_digests(out))
        assert mismatch is None, f"snapshot {sid} restored wrong: {mismatch}"
        out.unlink()
