"""Daemon start-up: systemd readiness, configuration file, bad flags, the unit file."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess

import pytest

from tests.conftest import BIN, ROOT, Daemon, free_tcp_port


def test_ready_is_sent_only_once_listeners_are_bound(tmp_path):
    """Type=notify: when READY=1 arrives, both sockets already accept."""
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(str(notify_path))
        ns.settimeout(20)
        d = Daemon(tmp_path)
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
        d.proc = subprocess.Popen(d.args(), env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        d._log = open(os.devnull, "wb")
        try:
            msg = ns.recv(4096).decode()
            assert "READY=1" in msg.splitlines()
            # Right now, with no retry: every listener answers.
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(d.nbd_socket))
                assert s.recv(8) == b"NBDMAGIC"
            with socket.create_connection(("127.0.0.1", d.tcp_port), timeout=5) as s:
                assert s.recv(8) == b"NBDMAGIC"
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(d.admin_socket))
            d.proc.send_signal(15)
            assert "STOPPING=1" in ns.recv(4096).decode()
            assert d.proc.wait(30) == 0
        finally:
            if d.proc.poll() is None:
                d.proc.kill()
            d.proc = None


def test_config_file_is_read_and_flags_win(tmp_path):
    port = free_tcp_port()
    cfg = tmp_path / "splitd.toml"
    data_dir = tmp_path / "from-config"
    cfg.write_text(f'data_dir = "{data_dir}"\n'
                   f'listen = ["tcp://127.0.0.1:{port}"]\n'
                   f'ensure_volume = ["cfgvol:4M"]\n'
                   f'max_connections = 7\n')
    d = Daemon(tmp_path, tcp=False)
    # Flags: our own --listen unix and --admin-socket win over the file's listen.
    d.extra_args = []
    args = [str(BIN / "splitd"), "--config", str(cfg),
            "--listen", f"unix:{d.nbd_socket}", "--admin-socket", str(d.admin_socket)]
    d.args = lambda: args
    d.start()
    try:
        st = d.call("status")
        assert st["data_dir"] == str(data_dir)
        assert [x["kind"] for x in st["listeners"]] == ["unix"]
        vols = d.call("volume.list")["volumes"]
        assert [v["name"] for v in vols] == ["cfgvol"]
        assert (data_dir / "volumes" / "cfgvol.img").exists()
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("args, words", [
    (["--listen", "tcp://nowhere:80"], "not an IP address"),
    (["--listen", "udp://1.2.3.4:5"], "listen URI"),
    (["--listen", "tcp://127.0.0.1:99999"], "out of range"),
    (["--tls", "require"], "needs --tls-cert"),
    (["--max-connections", "0"], "at least 1"),
    (["--config", "/nonexistent/splitd.toml"], "does not exist"),
    (["--ensure-volume", "bad/name:1G"], "name"),
])
def test_bad_configuration_is_one_line_and_exit_2(tmp_path, args, words):
    cp = subprocess.run([str(BIN / "splitd"), "--data-dir", str(tmp_path / "d"),
                         "--admin-socket", str(tmp_path / "a.sock"),
                         "--listen", f"unix:{tmp_path}/n.sock", *args],
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 2, cp.stderr
    lines = [x for x in cp.stderr.splitlines() if x.strip()]
    assert lines and words in lines[-1]
    assert "Traceback" not in cp.stderr


def test_unknown_config_key_is_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('data_dri = "/tmp/x"\n')
    cp = subprocess.run([str(BIN / "splitd"), "--config", str(cfg)],
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 2
    assert "unknown keys: data_dri" in cp.stderr


def test_listener_on_interface_by_name(tmp_path):
    """tcp://%lo:PORT binds every address of the loopback interface."""
    port = free_tcp_port()
    d = Daemon(tmp_path, extra_args=["--listen", f"lo=tcp://%lo:{port}"], tcp=False).start()
    try:
        lst = [x for x in d.call("status")["listeners"] if x["name"] == "lo"]
        assert lst and f"127.0.0.1:{port}" in lst[0]["bound"]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert s.recv(8) == b"NBDMAGIC"
    finally:
        d.stop()


def test_unknown_interface_is_refused(tmp_path):
    cp = subprocess.run([str(BIN / "splitd"), "--data-dir", str(tmp_path / "d"),
                         "--admin-socket", str(tmp_path / "a.sock"),
                         "--listen", "tcp://%nosuchif0:10809"],
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 2
    assert "no network interface named 'nosuchif0'" in cp.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_unit_file_verifies(tmp_path):
    unit = (ROOT / "systemd" / "splitd.service").read_text()
    assert "Type=notify" in unit and "StateDirectory=splitd" in unit
    # verify needs ExecStart to exist: point it at our venv's entry point.
    unit = unit.replace("/usr/local/bin/splitd", str(BIN / "splitd"))
    path = tmp_path / "splitd.service"
    path.write_text(unit)
    cp = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                        text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr


# -- start-up failures: sockets, directories, one-line errors --------------------------------------

def run_splitd(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "splitd"), "--config", "/dev/null", *args],
                          capture_output=True, text=True, timeout=timeout)


LOG_LINE = re.compile(r"(\S+ \S+ )?(DEBUG|INFO|WARNING|ERROR) splitd")


def one_line(cp: subprocess.CompletedProcess) -> str:
    """The error: one line, after any log lines of what went well before it."""
    lines = [x for x in cp.stderr.splitlines() if not LOG_LINE.match(x)]
    assert len(lines) == 1 and "Traceback" not in cp.stderr, cp.stderr
    assert lines[0].startswith("splitd: error: "), cp.stderr
    assert cp.stderr.splitlines()[-1] == lines[0], cp.stderr
    return lines[0]


def nbd_greets(path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(path))
        return s.recv(8) == b"NBDMAGIC"


def test_a_second_daemon_that_fails_leaves_the_first_ones_socket(make_daemon, tmp_path):
    a = make_daemon(tcp=False)
    cp = run_splitd("--data-dir", str(tmp_path / "other"),
                    "--admin-socket", str(tmp_path / "other.sock"),
                    "--listen", f"unix:{tmp_path}/b.sock",
                    "--listen", f"unix:{a.nbd_socket}")
    assert cp.returncode == 1
    assert one_line(cp) == f"splitd: error: {a.nbd_socket}: another process is listening there"
    # Its own socket, bound before the failure, is gone; A's is still there and answers.
    assert not (tmp_path / "b.sock").exists()
    assert nbd_greets(a.nbd_socket)
    assert a.call("status")["pid"] == a.proc.pid


def test_stop_leaves_socket_paths_another_daemon_took_over(make_daemon):
    """A daemon removes at stop only the sockets it made: not a newer one at the same path."""
    a = make_daemon(tcp=False)
    a.nbd_socket.unlink()
    a.admin_socket.unlink()
    b = make_daemon(tcp=False, start=False)
    b.nbd_socket, b.admin_socket = a.nbd_socket, a.admin_socket
    b.start()
    assert a.stop() == 0
    assert nbd_greets(b.nbd_socket)
    assert b.call("status")["pid"] == b.proc.pid


def test_a_socket_directory_that_does_not_exist_is_refused(tmp_path):
    missing = tmp_path / "nonexistent" / "dir"
    cp = run_splitd("--data-dir", str(tmp_path / "d"), "--admin-socket", str(tmp_path / "a.sock"),
                    "--listen", f"unix:{missing}/x.sock")
    assert cp.returncode == 2
    line = one_line(cp)
    assert f"directory {missing} does not exist" in line and "--listen" in line
    assert not (tmp_path / "nonexistent").exists()
    assert not (tmp_path / "d").exists()

    cp = run_splitd("--data-dir", str(tmp_path / "d"), "--admin-socket", f"{missing}/a.sock",
                    "--listen", f"unix:{tmp_path}/n.sock")
    assert cp.returncode == 2
    line = one_line(cp)
    assert f"directory {missing} does not exist" in line and "--admin-socket" in line
    assert not (tmp_path / "nonexistent").exists()


def test_sockets_in_a_data_directory_still_to_be_made(make_daemon, tmp_path):
    """`make run` style: both sockets in the data directory (./var of a fresh
    checkout), which splitd creates."""
    d = make_daemon(tcp=False, start=False)
    (tmp_path / "checkout").mkdir()
    d.data_dir = tmp_path / "checkout" / "var"
    d.nbd_socket = d.data_dir / "nbd.sock"
    d.admin_socket = d.data_dir / "admin.sock"
    d.start()
    assert nbd_greets(d.nbd_socket)
    assert d.stop() == 0
    assert not d.nbd_socket.exists() and not d.admin_socket.exists()


@pytest.mark.parametrize("args, message", [
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--handshake-timeout", "abc"], "argument --handshake-timeout: invalid float value: 'abc'"),
    (["--tls", "maybe"], "argument --tls: invalid choice: 'maybe'"),
])
def test_usage_errors_are_one_line(args, message):
    cp = run_splitd(*args)
    assert cp.returncode == 2
    line = one_line(cp)
    assert message in line and line.endswith("(see 'splitd --help')")


def test_data_directory_errors_name_the_setting(tmp_path):
    cp = run_splitd("--data-dir", "/etc/passwd/x", "--admin-socket", str(tmp_path / "a.sock"),
                    "--listen", f"unix:{tmp_path}/n.sock")
    assert cp.returncode == 1
    assert one_line(cp) == "splitd: error: data directory /etc/passwd/x: " \
                           "/etc/passwd is not a directory"
    assert not (tmp_path / "n.sock").exists()


def test_a_mistyped_data_directory_grows_no_tree(tmp_path):
    # The data directory itself is made; missing parents are a typo, not a wish.
    cp = run_splitd("--data-dir", str(tmp_path / "no" / "such" / "data"),
                    "--admin-socket", str(tmp_path / "a.sock"), "--listen", f"unix:{tmp_path}/n.sock")
    assert cp.returncode == 1
    assert one_line(cp) == (f"splitd: error: data directory {tmp_path}/no/such/data: "
                            f"no such file or directory ({tmp_path}/no/such)")
    assert not (tmp_path / "no").exists()


def test_a_port_in_use_says_which_listener(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cp = run_splitd("--data-dir", str(tmp_path / "d"), "--admin-socket", str(tmp_path / "a.sock"),
                        "--listen", f"unix:{tmp_path}/n.sock", "--listen", f"tcp://127.0.0.1:{port}")
    assert cp.returncode == 1
    assert one_line(cp) == (f"splitd: error: cannot listen on tcp://127.0.0.1:{port}: "
                            "address already in use")
    assert not (tmp_path / "n.sock").exists() and not (tmp_path / "a.sock").exists()


def test_help_documents_the_exit_status():
    cp = subprocess.run([str(BIN / "splitd"), "--help"], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0
    section = cp.stdout.split("exit status:", 1)[1]
    for code in ("0", "1", "2"):
        assert any(x.split()[:1] == [code] for x in section.splitlines()), section
