"""Three hosts in network namespaces, as DESIGN.md "Backup" draws them: the
storage host (splitd), the application host and the backup host, joined by
veth (harness/netns.py), with throw-away TLS certificates (harness/pki.py).

    site = Site(tmp).start()
    site.daemon.call("volume.create", name="p", size="64M")     # over its Unix socket
    token = site.daemon_token("backup-reader", "read")           # a file in tmp
    site.splitctl("backup", "--json", "locate", "s", "--port", "backup", token=token)
    site.close()

The daemon runs in `storage` with these ports:
  app     tcp://%IFACE:APP_PORT on the interface facing `app`
  backup  tcp://%IFACE:BACKUP_PORT on the interface facing `backup`
  unix    its Unix socket (the harness's; the mount namespace is shared, so
          the test sets volumes and pairs up through it)
TLS is required on the backup port (`?tls=require`), with a certificate for
every storage address; the app port is plaintext, as the application host's
nbdfuse (libnbd) cannot be given a private CA for nbds:// URIs.
The remote admin API (TLS + tokens) listens on every address of `storage`
(ADMIN_PORT), so both other hosts reach it; `admin_host` is a second address
of storage on the app link, the one the application host is told to use, so
that a test can take it away (unreachable management network) while the data
path on the link's first address goes on.

Ports are fixed: nobody else listens in these namespaces. close() stops the
daemon and removes the namespaces, and never raises.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness.netns import Namespaces, NetnsError, unavailable
from harness.pki import libnbd_cert_dir, make_ca, make_server_cert
from harness.splitd import BIN, Splitd

__all__ = ["Site", "NetnsError", "unavailable", "APP_PORT", "BACKUP_PORT", "ADMIN_PORT",
           "AGENT_PORT"]

HOSTS = ("storage", "app", "backup")
LINKS = (("storage", "app"), ("storage", "backup"), ("app", "backup"))
APP_PORT = 10809
BACKUP_PORT = 10819
ADMIN_PORT = 10810
AGENT_PORT = 10811
ADMIN_HOST = 3          # storage's second address on the app link (management)
ROOT = Path(__file__).resolve().parent.parent


class Site:
    def __init__(self, base: Path, daemon_args: list[str] | None = None):
        self.base = base
        self.net = Namespaces(HOSTS, LINKS)
        self.pki = base / "pki"
        self.daemon_args = list(daemon_args or [])
        self.daemon: Splitd | None = None
        # Every process run from here sees this tree's packages first.
        self.env = dict(os.environ, PYTHONPATH=str(ROOT))

    # -- addresses ----------------------------------------------------------------------

    @property
    def storage_app(self) -> str:
        """Storage's data address on the app link (the `app` port)."""
        return self.net.addr("storage", "app")

    @property
    def storage_backup(self) -> str:
        return self.net.addr("storage", "backup")

    @property
    def admin_host(self) -> str:
        """Storage's management address on the app link."""
        return self.net.addr("storage", "app", ADMIN_HOST)

    @property
    def app_addr(self) -> str:
        """The application host's address on its link to the backup host."""
        return self.net.addr("app", "backup")

    def admin_uri(self, from_ns: str) -> str:
        """The daemon's remote admin API as `from_ns` reaches it."""
        host = self.admin_host if from_ns == "app" else self.net.addr("storage", from_ns)
        return f"tcp://{host}:{ADMIN_PORT}"

    # -- set-up -------------------------------------------------------------------------

    def start(self) -> Site:
        try:
            self.net.create()
            self.net.add_address("storage", "app", ADMIN_HOST)
            self._make_pki()
            self.daemon = Splitd(self.base / "storage", self._daemon_args(),
                                 wrap=self.net.cmd("storage", []))
            self.daemon.base.mkdir(parents=True, exist_ok=True)
            self.daemon.start()
        except BaseException:
            self.close()
            raise
        return self

    def _make_pki(self) -> None:
        self.pki.mkdir(parents=True, exist_ok=True)
        self.ca = make_ca(self.pki)
        self.storage_cert, self.storage_key = make_server_cert(
            self.pki, names=[self.storage_app, self.storage_backup, self.admin_host],
            name="storage")
        self.app_cert, self.app_key = make_server_cert(self.pki, names=[self.app_addr],
                                                       name="app")
        self.nbd_certs = libnbd_cert_dir(self.pki / "libnbd", self.ca)

    def _daemon_args(self) -> list[str]:
        iface = self.net.ifname
        return ["--listen", f"app=tcp://%{iface('storage', 'app')}:{APP_PORT}",
                "--listen", f"backup=tcp://%{iface('storage', 'backup')}:{BACKUP_PORT}?tls=require",
                "--tls-cert", str(self.storage_cert),
                "--tls-key", str(self.storage_key),
                "--admin-listen", f"tcp://0.0.0.0:{ADMIN_PORT}", *self.daemon_args]

    def close(self) -> list[str]:
        """Stop the daemon, remove the namespaces; what was left behind."""
        left = []
        if self.daemon is not None:
            try:
                self.daemon.stop(timeout=15)
            except Exception as e:
                left.append(f"splitd: {e}")
        return left + self.net.close()

    # -- clients ------------------------------------------------------------------------

    def tls_uri(self, uri: str) -> str:
        """An nbds:// URI with the test CA for libnbd (tls-certificates=DIR)."""
        return f"{uri}{'&' if '?' in uri else '?'}tls-certificates={self.nbd_certs}"

    def daemon_token(self, name: str, scope: str, volumes: str | None = None) -> Path:
        """A daemon token made over the admin socket, in a file (mode 0600)."""
        assert self.daemon is not None
        args = ["token", "create", name, "--scope", scope]
        if volumes is not None:
            args += ["--volumes", volumes]
        cp = self.splitctl_local(*args)
        path = self.base / f"{name}.token"
        path.touch(mode=0o600)
        path.write_text(cp.stdout)
        return path

    def splitctl_local(self, *args: str) -> subprocess.CompletedProcess:
        """splitctl on the daemon's Unix socket (full local rights), checked."""
        assert self.daemon is not None
        env = dict(self.env, SPLITD_ADMIN_SOCKET=str(self.daemon.admin_socket))
        cp = subprocess.run([str(BIN / "splitctl"), *args], capture_output=True, text=True,
                            env=env, timeout=60, stdin=subprocess.DEVNULL)
        if cp.returncode != 0:
            raise NetnsError(f"splitctl {' '.join(args)} exited {cp.returncode}:\n"
                             f"{cp.stdout}{cp.stderr}")
        return cp

    def splitctl(self, ns: str, *args: str, token: Path | None = None,
                 **kw: Any) -> subprocess.CompletedProcess:
        """splitctl run in `ns` against the daemon's remote admin API (as
        `ns` reaches it) with the test CA and `token`."""
        opts = ["--connect", self.admin_uri(ns), "--tls-ca", str(self.ca)]
        if token is not None:
            opts += ["--token-file", str(token)]
        return self.net.run(ns, [str(BIN / "splitctl"), *opts, *args], env=self.env, **kw)

    # -- the host agent (splitd-host, agents/host) --------------------------------------

    def agent_args(self, state_dir: Path, *args: str | Path) -> list[str]:
        return [sys.executable, "-m", "agents.host.cli", "--state-dir", str(state_dir),
                *map(str, args)]

    def agent(self, ns: str, state_dir: Path, *args: str | Path, check: bool = True,
              timeout: float = 60) -> subprocess.CompletedProcess:
        """One `splitd-host` command in `ns`; check: NetnsError if it fails."""
        return self.net.run(ns, self.agent_args(state_dir, *args), env=self.env, check=check,
                            timeout=timeout)

    def serve_agent(self, state_dir: Path, *args: str, timeout: float = 20) -> subprocess.Popen:
        """`splitd-host serve` in `app`: TLS + tokens on app_addr:AGENT_PORT, its
        Unix socket in `state_dir`; returns once it accepts connections."""
        state_dir.mkdir(parents=True, exist_ok=True)
        sock = state_dir / "agent.sock"
        log = open(state_dir / "serve.log", "ab")
        proc = self.net.popen("app", self.agent_args(
            state_dir, "serve", "--listen", f"tcp://{self.app_addr}:{AGENT_PORT}",
            "--tls-cert", self.app_cert, "--tls-key", self.app_key, "--socket", sock, *args),
            env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                self.net.stop(proc)
                raise NetnsError(f"splitd-host serve did not start (exit {proc.returncode}):\n"
                                 + (state_dir / "serve.log").read_text(errors="replace"))
            time.sleep(0.05)
        return proc

    def agent_token(self, state_dir: Path, name: str, scope: str,
                    dirs: str | None = None) -> Path:
        """A host agent token (splitd-host token create), in a file."""
        args = ["token", "create", name, "--scope", scope]
        if dirs is not None:
            args += ["--dirs", dirs]
        cp = self.agent("app", state_dir, *args)
        path = self.base / f"agent-{name}.token"
        path.touch(mode=0o600)
        path.write_text(cp.stdout)
        return path

    def backup_prepare(self, directory: str | Path, token: Path, port: str = "backup",
                       **kw: Any) -> subprocess.CompletedProcess:
        """`splitctl --json backup prepare` from the backup host to the agent."""
        return self.net.run("backup", [
            str(BIN / "splitctl"), "--json", "backup", "prepare",
            "--host", f"{self.app_addr}:{AGENT_PORT}", "--dir", str(directory), "--port", port,
            "--token-file", str(token), "--tls-ca", str(self.ca)], env=self.env, **kw)

    # -- the application host's filesystem ----------------------------------------------

    def ext4_pair(self, primary: str, secondary: str, size: int, mkfs_args: tuple[str, ...] = (),
                  sync_timeout: float = 60) -> None:
        """Volume `primary` of `size` bytes holding an empty ext4 (made in a
        sparse file here and copied in through the Unix socket, holes
        skipped), paired with `secondary` and mirrored."""
        d = self.daemon
        assert d is not None
        d.call("volume.create", name=primary, size=size)
        image = self.base / f"{primary}.raw"
        try:
            with open(image, "wb") as f:
                f.truncate(size)
            subprocess.run(["mkfs.ext4", "-q", "-F", *mkfs_args, str(image)], check=True,
                           capture_output=True, timeout=600)
            subprocess.run(["nbdcopy", str(image), d.uri(primary)], check=True,
                           capture_output=True, timeout=600)
        finally:
            image.unlink(missing_ok=True)
        d.call("pair.create", primary=primary, secondary=secondary, create_secondary=True)
        with d.admin(timeout=60) as a:
            a.wait_pair(secondary, "synced", timeout=sync_timeout, interval=0.1)

    def attach_primary(self, state_dir: Path, volume: str, mount: Path) -> None:
        """`splitd-host attach VOLUME --port app --mount MOUNT` in `app`: the
        agent reaches the daemon's admin API by the management address with
        a split token for VOLUME*, the data by the app port."""
        token = self.daemon_token(f"app-host-{volume}", "split", f"{volume}*")
        self.agent("app", state_dir, "attach", volume, "--daemon", self.admin_uri("app"),
                   "--token-file", token, "--tls-ca", self.ca, "--port", "app", "--mount", mount)

    def writer(self, folder: Path, log: Path, *args: str, files: int = 10,
               timeout: float = 30) -> subprocess.Popen:
        """harness/writer.py in `app`, writing into `folder`; returns once it
        has completed `files` files (close() stops it, or net.stop())."""
        from harness.writer import records

        proc = self.net.popen("app", [sys.executable, "-m", "harness.writer", str(folder), str(log),
                                      *args],
                              env=self.env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not log.exists() or len(records(str(log))) < files:
            if proc.poll() is not None or time.monotonic() > deadline:
                self.net.stop(proc)
                raise NetnsError(f"the writer completed fewer than {files} files in {timeout:g} s"
                                 f" (exit {proc.returncode}): {proc.communicate()[1]!r}")
            time.sleep(0.05)
        return proc
