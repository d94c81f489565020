"""splitd-host serve (agents/host/service.py) as its own process: the local
socket, TLS and tokens on TCP (the daemon's protocol, so splitctl's client
works unchanged), sd_notify, SIGTERM, leftovers thawed at start, and prepare
end to end against the real daemon with ext4 on an attached volume, through
`splitctl backup prepare`."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from remoteapi.server import MAX_UNAUTHENTICATED
from splitctl.client import AdminClient, AdminError
from splitctl.commands.backup import HostAgentClient
from tests.agents.host.conftest import (
    Host,
    hook_script,
    journal,
    wait_frozen,
    wait_writable,
    writable,
)
from tests.conftest import ROOT, free_tcp_port, need
from tests.daemon.pki import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    need("openssl")
    return make_pki(tmp_path_factory.mktemp("pki"))


class Agent:
    """splitd-host serve on `host`'s state directory: a Unix socket and a TLS
    port on 127.0.0.1, its log in a file, READY awaited on a NOTIFY_SOCKET."""

    def __init__(self, host: Host, base: Path, pki: dict, extra: tuple[str, ...] = ()):
        self.host, self.base, self.pki, self.extra = host, base, pki, extra
        self.port = free_tcp_port()
        self.uri = f"tcp://127.0.0.1:{self.port}"
        self.socket = base / "agent.sock"
        unique = f"{os.getpid()}-{time.monotonic_ns()}"
        self.log_path = base / f"agent-{unique}.log"
        self.proc: subprocess.Popen | None = None
        self.notified: list[str] = []
        self._notify_path = base / f"notify-{unique}.sock"
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(self._notify_path))

    def start(self) -> Agent:
        env = dict(self.host.env, NOTIFY_SOCKET=str(self._notify_path))
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                self.host.args("serve", "--socket", self.socket, "--listen", self.uri,
                               "--tls-cert", self.pki["cert"], "--tls-key", self.pki["key"],
                               *self.extra),
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.wait_notify("READY=1")
        return self

    def wait_notify(self, what: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            self._notify.settimeout(0.2)
            try:
                message = self._notify.recv(4096).decode()
            except TimeoutError:
                assert self.proc is not None
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"no {what} from splitd-host (exit {self.proc.poll()}):"
                                         f"\n{self.log()}") from None
                continue
            self.notified.append(message)
            if what in message.split("\n"):
                return message

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def local(self, timeout: float = 60.0) -> AdminClient:
        return AdminClient(str(self.socket), timeout=timeout)

    def remote(self, secret: str, ca: Path | None = None) -> HostAgentClient:
        return HostAgentClient(self.uri, secret, str(ca or self.pki["ca"]), timeout=60)

    def token(self, name: str, scope: str, dirs: str | None = None) -> Path:
        args = ["token", "create", name, "--scope", scope]
        if dirs is not None:
            args += ["--dirs", dirs]
        path = self.base / f"{name}.token"
        path.write_text(self.host.run(*args).stdout)
        return path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"splitd-host did not stop on signal {sig}:\n{self.log()}") from None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._notify.close()
        self._notify_path.unlink(missing_ok=True)


@pytest.fixture
def make_agent(host, tmp_path, pki):
    made: list[Agent] = []

    def make(*extra: str) -> Agent:
        agent = Agent(host, tmp_path, pki, extra)
        made.append(agent)
        return agent.start()

    yield make
    for agent in made:
        agent.close()


@pytest.fixture
def agent(make_agent):
    return make_agent("--handshake-timeout", "2")


def splitctl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    for var in ("SPLITD_HOST_TOKEN_FILE", "SPLITD_HOST_TLS_CA"):
        if env is None or var not in env:
            full_env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "splitctl.cli", *args], capture_output=True,
                          text=True, env=full_env, timeout=120, stdin=subprocess.DEVNULL)


def backup_prepare(agent: Agent, token: Path, directory: Path | str, *extra: str,
                   port: str = "unix", host: str | None = None) -> subprocess.CompletedProcess:
    return splitctl("backup", "prepare", "--host", host or f"127.0.0.1:{agent.port}",
                    "--dir", str(directory), "--port", port, "--token-file", str(token),
                    "--tls-ca", str(agent.pki["ca"]), *extra)


def one_line_error(cp: subprocess.CompletedProcess) -> str:
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1, cp.stderr
    return lines[0]


# -- the service: start, status, stop ------------------------------------------------------------

def test_ready_status_and_clean_stop(agent):
    ready = next(m for m in agent.notified if "READY=1" in m)
    assert f"MAINPID={agent.proc.pid}" in ready
    assert oct(agent.socket.stat().st_mode & 0o777) == "0o660"
    with agent.local() as c:
        assert c.call("ping") == {"pong": True}
        status = c.call("status")
        assert c.call("list") == {"attachments": []}
    assert status["pid"] == agent.proc.pid and status["watchdog"]["alive"]
    assert status["watchdog"]["timeout_s"] == 10.0 and status["thawed_at_start"] == []
    assert status["expedite"] is True
    assert status["prepares"] == {"done": 0, "failed": 0, "running": [], "last": None}
    assert str(agent.socket) in status["listeners"]
    assert f"127.0.0.1:{agent.port}" in status["listeners"]
    watchdog = status["watchdog"]["pid"]

    started = time.monotonic()
    assert agent.stop() == 0
    assert time.monotonic() - started < 10
    agent.wait_notify("STOPPING=1", timeout=1)
    assert not agent.socket.exists()
    assert not Path(f"/proc/{watchdog}").exists() or b"agents.host.watchdog" not in \
        Path(f"/proc/{watchdog}/cmdline").read_bytes()
    assert "stopped" in agent.log()


def test_configuration_file_and_refusals(host, make_agent, tmp_path, pki):
    config = tmp_path / "agent.toml"
    config.write_text('watchdog_timeout = 3\nhandshake_timeout = 2.5\nlog_level = "debug"\n')
    agent = make_agent("--config", str(config), "--watchdog-timeout", "4")
    with agent.local() as c:
        status = c.call("status")
    assert status["watchdog"]["timeout_s"] == 4.0     # the flag wins
    assert status["expedite"] is True
    assert agent.stop() == 0
    config.write_text("expedite = true\n")
    agent = make_agent("--config", str(config), "--no-expedite")
    with agent.local() as c:
        assert c.call("status")["expedite"] is False     # the flag wins
    assert agent.stop() == 0

    for args, words in [
        (["--config", str(tmp_path / "missing.toml")], "cannot read the configuration"),
        (["--listen", "tcp://127.0.0.1:1"], "--listen needs --tls-cert and --tls-key"),
        (["--listen", "127.0.0.1:1", "--tls-cert", "c", "--tls-key", "k"], "tcp://HOST:PORT"),
    ]:
        cp = host.run("serve", "--socket", tmp_path / "x.sock", *args, check=False)
        assert cp.returncode == 2, cp.stderr
        assert words in one_line_error(cp)
    cp = host.run("serve", "--watchdog-timeout", "0", check=False)
    assert cp.returncode == 2 and "--watchdog-timeout: 0 s: give more than 0" in cp.stderr
    config.write_text("watchdog_timeout = 0\n")
    cp = host.run("serve", "--config", config, check=False)
    assert cp.returncode == 2 and "watchdog_timeout: give seconds" in one_line_error(cp)
    config.write_text('expedite = "no"\n')
    cp = host.run("serve", "--config", config, check=False)
    assert cp.returncode == 2 and "expedite: give true or false" in one_line_error(cp)
    config.write_text('listn = "tcp://127.0.0.1:1"\n')
    cp = host.run("serve", "--config", config, check=False)
    assert cp.returncode == 2 and "unknown key 'listn'" in one_line_error(cp)
    cp = host.run("serve", "--socket", tmp_path / "y.sock", "--listen", "tcp://127.0.0.1:1",
                  "--tls-cert", tmp_path / "nope.pem", "--tls-key", tmp_path / "nope.pem",
                  check=False)
    assert cp.returncode == 1 and "cannot load TLS certificate" in one_line_error(cp)


# -- tokens and TLS ------------------------------------------------------------------------------

def test_tokens_scopes_and_revocation(agent, tmp_path):
    read = agent.token("monitor", "read").read_text()
    with agent.remote(read) as c:
        assert c.call("ping") == {"pong": True}
        assert c.identity == {"token": "monitor", "scope": "read", "dirs": "*"}
        assert c.call("status")["watchdog"]["alive"]
        with pytest.raises(AdminError) as e:
            c.call("prepare", directory=str(tmp_path), port="unix")
        assert e.value.code == "forbidden" and "prepare needs scope prepare" in e.value.message
        # Revoked by the command while the service runs: the next request is refused.
        agent.host.run("token", "revoke", "monitor")
        with pytest.raises(AdminError) as e:
            c.call("status")
        assert e.value.code == "unauthorized" and "revoked" in e.value.message
    with pytest.raises(AdminError) as e, agent.remote(read) as c:
        c.call("ping")
    assert e.value.code == "unauthorized"

    with pytest.raises(AdminError) as e, agent.remote("not-a-token") as c:
        c.call("ping")
    assert e.value.code == "unauthorized" and "splitd-host token create" in e.value.message

    # A prepare token is held to its directories, as asked for and as resolved.
    limited = agent.token("backup", "prepare", dirs="/srv/*").read_text()
    link = tmp_path / "link"
    link.symlink_to("/tmp")
    with agent.remote(limited) as c:
        with pytest.raises(AdminError) as e:
            c.call("prepare", directory=str(tmp_path), port="unix")
        assert e.value.code == "forbidden" and "'/srv/*'" in e.value.message
        with pytest.raises(AdminError) as e:
            c.call("token.create")
        assert e.value.code == "forbidden"
    # Any directory: prepare itself refuses one not on a splitd volume.
    anywhere = agent.token("ops", "prepare").read_text()
    with agent.remote(anywhere) as c:
        with pytest.raises(AdminError) as e:
            c.call("prepare", directory=str(tmp_path), port="unix")
        assert e.value.code == "not-splitd" and "not on a splitd volume" in e.value.message

    _, listed, _ = agent.host.json("token", "list")
    names = {t["name"]: t for t in listed["tokens"]}
    assert set(names) == {"backup", "ops"} and names["backup"]["dirs"] == "/srv/*"
    assert names["ops"]["last_used"] is not None and "token" not in names["ops"]
    assert "secret" not in json.dumps(listed)
    assert "sha256" not in json.dumps(listed)


def test_token_command_refusals(host):
    cp = host.run("token", "create", "t", "--scope", "read", "--dirs", "/srv/*", check=False)
    assert cp.returncode == 2 and "dirs limits only a prepare token" in one_line_error(cp)
    host.run("token", "create", "t", "--scope", "admin")
    cp = host.run("token", "create", "t", "--scope", "read", check=False)
    assert cp.returncode == 1 and "exists already" in one_line_error(cp)
    cp = host.run("token", "revoke", "nope", check=False)
    assert cp.returncode == 1 and "no token named 'nope'" in one_line_error(cp)
    cp = host.run("token", "create", "bad name", "--scope", "read", check=False)
    assert cp.returncode == 2 and "invalid token name" in cp.stderr
    code, made, _ = host.json("token", "create", "j", "--scope", "prepare", "--dirs", "/srv/*")
    assert made["dirs"] == "/srv/*" and len(made["token"]) >= 43
    cp = host.run("token", "list")
    assert cp.stdout.splitlines()[0].split() == ["NAME", "SCOPE", "DIRS", "CREATED", "LAST", "USED"]


def test_plaintext_and_unauthenticated_connections_are_bounded(agent):
    # Plaintext JSON to the TLS port: the handshake fails, the connection closes.
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as s:
        s.sendall(b'{"id": 1, "method": "auth", "params": {"token": "x"}}\n')
        data = s.recv(4096)
        assert not data.startswith(b"{")        # a TLS alert, or nothing
    time.sleep(0.2)
    assert "TLS handshake with 127.0.0.1" in agent.log()

    idle = [socket.create_connection(("127.0.0.1", agent.port), timeout=10)
            for _ in range(MAX_UNAUTHENTICATED)]
    try:
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as extra:
            assert extra.recv(10) == b""            # closed at once
        assert "without a token yet" in agent.log()
        # The local socket is not counted: it still answers.
        with agent.local() as c:
            assert c.call("ping") == {"pong": True}
        started = time.monotonic()
        for s in idle:
            try:
                assert s.recv(10) == b""            # closed by the handshake timeout
            except ConnectionResetError:
                pass
        assert time.monotonic() - started < 5
        assert "sent no token within 2s" in agent.log()
    finally:
        for s in idle:
            s.close()
    secret = agent.token("monitor", "read").read_text()
    with agent.remote(secret) as c:
        assert c.call("ping") == {"pong": True}


def test_long_lines_and_bad_requests(agent):
    from remoteapi.server import MAX_LINE

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(agent.socket))
        s.settimeout(10)
        f = s.makefile("rwb")
        for line, code in [(b"not json", "bad-request"), (b'{"id": 7, "method": 5}', "bad-request"),
                           (b'{"id": 8, "method": "prepare", "params": {"port": "x"}}', "bad-input"),
                           (b'{"id": 9, "method": "auth", "params": {"token": "x"}}', "conflict"),
                           (b'{"id": 10, "method": "volume.delete"}', "unknown-method")]:
            f.write(line + b"\n")
            f.flush()
            assert json.loads(f.readline())["error"]["code"] == code, line
        f.write(b'{"id": 11, "method": "ping", "params": {"x": "' + b"y" * MAX_LINE + b'"}}\n')
        f.flush()
        reply = json.loads(f.readline())
        assert reply["error"]["code"] == "bad-request" and "longer than" in reply["error"]["message"]
        assert f.readline() == b""      # and closed
    with agent.local() as c:
        assert c.call("ping") == {"pong": True}


def test_splitctl_backup_prepare_errors(agent, make_daemon, tmp_path, pki):
    read = agent.token("monitor", "read")
    prep = agent.token("backup", "prepare")

    cp = backup_prepare(agent, prep, tmp_path)
    assert cp.returncode == 1
    line = one_line_error(cp)
    assert "refused to prepare" in line and "not-splitd" in line and "not on a splitd volume" in line
    cp = backup_prepare(agent, prep, tmp_path, "--json")
    assert json.loads(cp.stdout)["error"]["code"] == "not-splitd"

    cp = backup_prepare(agent, read, tmp_path)
    assert cp.returncode == 1 and "forbidden" in one_line_error(cp)
    agent.host.run("token", "revoke", "backup")
    cp = backup_prepare(agent, prep, tmp_path, "--json")
    assert cp.returncode == 1 and json.loads(cp.stdout)["error"]["code"] == "unauthorized"
    assert "not valid" in one_line_error(cp)

    closed = free_tcp_port()
    cp = backup_prepare(agent, read, tmp_path, host=f"127.0.0.1:{closed}")
    assert cp.returncode == 4
    assert "cannot reach splitd-host at" in one_line_error(cp) and "connection refused" in cp.stderr
    cp = splitctl("backup", "prepare", "--host", f"127.0.0.1:{agent.port}", "--dir", "/x",
                  "--port", "unix", "--token-file", str(read), "--tls-ca", str(pki["other_ca"]))
    assert cp.returncode == 4 and "certificate of splitd-host at" in one_line_error(cp)
    # A plaintext port (the daemon's NBD listener) is not the agent's.
    plain = make_daemon(tcp=True)
    cp = backup_prepare(agent, read, tmp_path, host=f"127.0.0.1:{plain.tcp_port}")
    assert cp.returncode == 4
    assert "TLS failed with splitd-host at" in one_line_error(cp) and "agent's port" in cp.stderr

    # Nothing sent: the command line is wrong.
    cp = splitctl("backup", "prepare", "--host", "h:1", "--dir", "/x", "--port", "unix")
    assert cp.returncode == 2 and "needs the agent's token" in one_line_error(cp)
    cp = splitctl("backup", "prepare", "--host", "h:x", "--dir", "/x", "--port", "unix",
                  "--token-file", str(read))
    assert cp.returncode == 2 and "--host 'h:x'" in one_line_error(cp)
    cp = splitctl("backup", "prepare", "--host", "h", "--dir", "/x", "--port", "unix",
                  env={"SPLITD_HOST_TOKEN_FILE": str(tmp_path / "none")})
    assert cp.returncode == 2 and "cannot read the token file" in one_line_error(cp)


def test_help_texts(host):
    serve = host.run("serve", "--help").stdout
    for words in ("--listen tcp://ADDR:PORT", "--watchdog-timeout", "--handshake-timeout",
                  "/etc/splitd-host/splitd-host.toml", "prepare {directory, port}", "SIGTERM"):
        assert words in serve, words
    create = host.run("token", "create", "--help").stdout
    assert "--dirs GLOB" in create and "shown only" not in create and "never shown again" in create
    backup = splitctl("backup", "prepare", "--help").stdout
    for words in ("--host HOST[:PORT]", "10811", "SPLITD_HOST_TOKEN_FILE", "window_ms",
                  "splitd-host token create", "exit status"):
        assert words in backup, words


# -- prepare, end to end -------------------------------------------------------------------------

def test_prepare_end_to_end(host, paired, daemon, make_agent, tmp_path):
    need("nbdcopy", "debugfs", "e2fsck")
    mnt = paired
    agent = make_agent()
    token = agent.token("backup", "prepare", dirs=f"{tmp_path}/*")
    (mnt / "hello").write_text("before the split\n")
    os.sync()

    cp = backup_prepare(agent, token, mnt)
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert lines[0].startswith("nbd+unix:///s?socket=")
    text = "\n".join(lines[1:])
    for words in ("pair", "split gen", "generation", "frozen", "FIFREEZE", "prepare", str(mnt)):
        assert words in text, words
    (mnt / "hello").write_text("after the split\n")
    # The next backup: the pair mirrors again first (the backup agent's job).
    daemon.call("pair.resync", name="s")
    with AdminClient(str(daemon.admin_socket)) as admin:
        admin.wait_pair("s", "synced", timeout=60, interval=0.1)

    cp = backup_prepare(agent, token, mnt / ".", "--json")
    assert cp.returncode == 0, cp.stderr
    reply = json.loads(cp.stdout)
    assert reply["pair"] == "s" and reply["volume"] == "p" and reply["mountpoint"] == str(mnt)
    assert reply["uri"] == lines[0] and reply["window_ms"] < 5000 and reply["prepare_ms"] > 0
    assert "split_gen" in reply and isinstance(reply["generation"], int)

    # The secondary holds the filesystem as it was at the second prepare: clean,
    # with the file written in between.
    image = tmp_path / "s.img"
    subprocess.run(["nbdcopy", reply["uri"], str(image)], check=True, timeout=120)
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, timeout=60)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(["debugfs", "-R", "cat /hello", str(image)], capture_output=True,
                         text=True, timeout=60)
    assert cat.stdout == "after the split\n"

    with agent.local() as c:
        status = c.call("status")
        listed = c.call("list")
    assert status["prepares"]["done"] == 2 and status["prepares"]["last"]["pair"] == "s"
    assert [a["volume"] for a in listed["attachments"]] == ["p"]
    assert "prepared " in agent.log()
    assert writable(mnt)


def test_prepare_runs_in_a_worker_one_per_filesystem(host, paired, make_agent, tmp_path):
    mnt = paired
    hook = hook_script(tmp_path, 'if [ "$1" = freeze ]; then sleep 2; fi')
    agent = make_agent("--hook", str(hook))
    results: list[object] = []

    def first() -> None:
        with agent.local() as c:
            try:
                results.append(c.call("prepare", directory=str(mnt), port="unix"))
            except AdminError as e:
                results.append(e)

    worker = threading.Thread(target=first)
    worker.start()
    try:
        time.sleep(0.5)     # the first prepare is in its hook
        with agent.local() as c:
            started = time.monotonic()
            assert c.call("ping") == {"pong": True}
            assert time.monotonic() - started < 0.5          # the loop stays responsive
            running = c.call("status")["prepares"]["running"]
            assert [r["directory"] for r in running] == [str(mnt)]
            with pytest.raises(AdminError) as e:
                c.call("prepare", directory=str(mnt), port="unix")
            assert e.value.code == "busy" and str(mnt) in e.value.message
    finally:
        worker.join(60)
    assert isinstance(results[0], dict) and results[0]["pair"] == "s", results
    with agent.local() as c:
        assert c.call("status")["prepares"]["failed"] == 1


def test_leftovers_thawed_at_start_show_in_status(host, stalling, make_agent):
    """kill -9 of the service and of its watchdog (systemd ending the cgroup)
    while a prepare holds the filesystem frozen: the next service thaws it at
    start, logs it and reports it in status."""
    mnt, proxy = stalling
    agent = make_agent()
    with agent.local() as c:
        watchdog = c.call("status")["watchdog"]["pid"]
    proxy.stall.set()
    client = agent.local(timeout=30)

    def call() -> None:
        try:
            client.call("prepare", directory=str(mnt), port="unix")
        except AdminError:
            pass        # the service was killed under it

    worker = threading.Thread(target=call)
    worker.start()
    try:
        entry = wait_frozen(host, agent.proc, mnt)
        assert entry["watchdog_pid"] == watchdog and entry["agent_pid"] == agent.proc.pid
        assert proxy.held.wait(10)
        # The watchdog first: it would thaw at once on its agent's death.
        os.kill(watchdog, signal.SIGKILL)
        os.kill(agent.proc.pid, signal.SIGKILL)
        agent.proc.wait(10)
        time.sleep(0.3)
        assert not writable(mnt, timeout=0.5), "thawed without an agent or a watchdog?"
    finally:
        proxy.stall.clear()
        worker.join(60)
        client.close()

    again = make_agent()
    with again.local() as c:
        status = c.call("status")
    [thawed] = status["thawed_at_start"]
    assert thawed["mountpoint"] == str(mnt) and thawed["result"] == "thawed", thawed
    assert thawed["agent_pid"] == agent.proc.pid and thawed["watchdog_pid"] == watchdog
    assert f"{mnt} was left frozen by agent pid {agent.proc.pid}" in again.log()
    assert not journal(host)
    wait_writable(mnt, within=5)


def test_sigterm_during_a_prepare_waits_for_it_and_thaws(host, stalling, make_agent):
    """SIGTERM while a split hangs inside the window: the service closes its
    listeners, lets the prepare end (thawed at the watchdog timeout, and
    answered), stops its watchdog and exits 0; nothing stays frozen."""
    mnt, proxy = stalling
    agent = make_agent("--watchdog-timeout", "2")
    proxy.stall.set()
    replies: list[object] = []
    client = agent.local(timeout=30)

    def call() -> None:
        try:
            replies.append(client.call("prepare", directory=str(mnt), port="unix"))
        except AdminError as e:
            replies.append(e)

    worker = threading.Thread(target=call)
    worker.start()
    try:
        wait_frozen(host, agent.proc, mnt)
        assert proxy.held.wait(10)
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.stop(timeout=20) == 0
        took = time.monotonic() - started
    finally:
        proxy.stall.clear()
        worker.join(30)
        client.close()
    assert took < 10, took
    [reply] = replies
    assert isinstance(reply, AdminError), reply
    assert reply.code in ("split-failed", "watchdog-thawed"), reply.message
    assert "waiting for 1 prepares to finish" in agent.log()
    assert writable(mnt) and not journal(host)


# -- the unit and the example configuration ------------------------------------------------------

def test_unit_file_verifies(tmp_path):
    need("systemd-analyze")
    unit = (ROOT / "systemd" / "splitd-host.service").read_text()
    for words in ("Type=notify", "ExecStopPost=/usr/local/bin/splitd-host thaw-all",
                  "CAP_SYS_ADMIN", "KillMode=mixed"):
        assert words in unit, words
    # verify needs the executables to exist: a stand-in for the installed link.
    exe = tmp_path / "splitd-host"
    exe.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m agents.host.cli \"$@\"\n")
    exe.chmod(0o755)
    path = tmp_path / "splitd-host.service"
    path.write_text(unit.replace("/usr/local/bin/splitd-host", str(exe)))
    cp = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                        text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr


def test_example_configuration_loads():
    from argparse import Namespace

    from agents.host.service import KEYS, load_config

    flags = Namespace(config=str(ROOT / "systemd" / "splitd-host.toml"),
                      **{key: None for key in KEYS})
    cfg = load_config(flags)
    assert cfg.listen == "tcp://0.0.0.0:10811" and cfg.watchdog_timeout == 10.0
    assert cfg.socket == "/run/splitd-host/agent.sock"
    assert cfg.expedite is True
