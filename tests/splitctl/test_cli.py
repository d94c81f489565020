"""splitctl against the real daemon (the `daemon` fixture of tests/conftest.py)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import BIN


def run_splitctl(*args: str, socket_path: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SPLITD_ADMIN_SOCKET=socket_path)
    return subprocess.run([str(BIN / "splitctl"), *args], capture_output=True, text=True,
                          env=env, timeout=60)


def one_line_error(cp: subprocess.CompletedProcess, prefix: str) -> str:
    assert cp.stdout == ""
    assert cp.stderr.count("\n") == 1 and cp.stderr.startswith(prefix), cp.stderr
    assert "Traceback" not in cp.stderr
    return cp.stderr


# -- without a daemon ---------------------------------------------------------

@pytest.mark.parametrize("command", [[], ["status"], ["volume"], ["volume", "create"],
                                     ["volume", "list"], ["volume", "show"],
                                     ["volume", "resize"], ["volume", "delete"]])
def test_help(command, tmp_path):
    cp = run_splitctl(*command, "--help", socket_path=str(tmp_path / "none"))
    assert cp.returncode == 0
    assert cp.stdout.startswith("usage: splitctl") and "examples:" in cp.stdout


def test_daemon_not_running(tmp_path):
    path = str(tmp_path / "admin.sock")
    cp = run_splitctl("volume", "list", socket_path=path)
    assert cp.returncode == UNREACHABLE
    one_line_error(cp, f"splitctl: cannot reach splitd at {path}: ")


@pytest.mark.parametrize("args, reason", [
    (["volume", "create", "db", "1000"], "not a multiple of 4096"),
    (["volume", "create", "db", "1.5G"], "invalid size"),
    (["volume", "create", "db", "0"], "greater than 0"),
    (["volume", "create", "../db", "1G"], "invalid volume name"),
    (["volume", "create", "db", "1G", "--region-size", "3K"], "power of two"),
    (["volume", "resize", "db", "12345"], "multiple of 4096"),
    (["volume", "show", "a b"], "invalid volume name"),
    (["volume", "frobnicate"], "invalid choice"),
    (["volume", "create", "db"], "required: SIZE"),
    (["volume", "create", "db", "1X"], "with a K, M, G, T, P or E suffix"),
    (["volume", "create", "db", "8E"], "at most 9223372036854771712 bytes"),
    (["volume", "resize", "db", "9E"], "at most 9223372036854771712 bytes"),
])
def test_bad_command_lines_exit_2_in_one_line(args, reason, tmp_path):
    # Checked before anything is sent: no daemon is needed to refuse these.
    cp = run_splitctl(*args, socket_path=str(tmp_path / "none"))
    assert cp.returncode == 2
    assert reason in one_line_error(cp, "splitctl: error: ")


# -- with the daemon ----------------------------------------------------------

def test_status(daemon):
    cp = daemon.splitctl("status")
    assert cp.stdout.startswith("splitd ") and "volumes:     0" in cp.stdout
    assert f"  unix=unix:{daemon.nbd_socket}\n" in cp.stdout
    status = json.loads(daemon.splitctl("status", "--json").stdout)
    assert status["pid"] == daemon.proc.pid
    assert status["volumes"] == 0 and status["connections"] == []


def test_volume_commands(daemon):
    out = daemon.splitctl("volume", "create", "db", "10G").stdout
    assert out == "created volume db: 10 GiB, region size 64 KiB\n"
    daemon.splitctl("volume", "create", "scratch", "512M", "--region-size", "1M", "--read-only")

    lines = daemon.splitctl("volume", "list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "ALLOCATED", "REGION", "MODE", "CONNS"]
    assert lines[1].split() == ["db", "10", "GiB", "0", "B", "64", "KiB", "rw", "0"]
    assert lines[2].split() == ["scratch", "512", "MiB", "0", "B", "1", "MiB", "ro", "0"]
    assert len({len(line) for line in lines}) == 1  # columns line up (CONNS is right-aligned)

    shown = daemon.splitctl("volume", "show", "db").stdout
    assert "size:        10 GiB (10737418240 bytes)" in shown
    assert f"path:        {daemon.data_dir}/volumes/db.img" in shown

    out = daemon.splitctl("volume", "resize", "db", "20G").stdout
    assert out.startswith("volume db is now 20 GiB")
    assert daemon.call("volume.show", name="db")["size"] == 20 << 30

    assert daemon.splitctl("volume", "delete", "scratch").stdout == "deleted volume scratch\n"
    assert [v["name"] for v in daemon.call("volume.list")["volumes"]] == ["db"]
    assert not (daemon.data_dir / "volumes" / "scratch.img").exists()


def test_json_output_on_every_command(daemon):
    created = json.loads(daemon.splitctl("volume", "create", "db", "1G", "--json").stdout)
    assert created["size"] == 1 << 30 and created["region_size"] == 65536
    for args in (["volume", "list", "--json"], ["--json", "volume", "list"],
                 ["volume", "--json", "list"]):
        listed = json.loads(daemon.splitctl(*args).stdout)
        assert [v["name"] for v in listed["volumes"]] == ["db"]
    shown = json.loads(daemon.splitctl("volume", "show", "db", "--json").stdout)
    assert shown == created
    resized = json.loads(daemon.splitctl("volume", "resize", "db", "2G", "--json").stdout)
    assert resized["size"] == 2 << 30
    deleted = json.loads(daemon.splitctl("volume", "delete", "db", "--json").stdout)
    assert deleted == {"name": "db", "deleted": True, "connections_closed": 0}


def test_socket_option_wins_over_the_environment(daemon, tmp_path):
    cp = run_splitctl("--socket", str(daemon.admin_socket), "status",
                      socket_path=str(tmp_path / "wrong.sock"))
    assert cp.returncode == 0, cp.stderr
    cp = run_splitctl("volume", "list", "--socket", str(daemon.admin_socket),
                      socket_path=str(tmp_path / "wrong.sock"))
    assert cp.returncode == 0 and cp.stdout == "no volumes\n"


def test_daemon_refusals_exit_1(daemon):
    daemon.splitctl("volume", "create", "db", "1G")
    cases = [
        (["volume", "create", "db", "1G"], "splitctl: volume 'db' already exists"),
        (["volume", "show", "nope"], "splitctl: no volume named 'nope'"),
        (["volume", "delete", "nope"], "splitctl: no volume named 'nope'"),
        (["volume", "resize", "db", "512M"], "splitctl: volume 'db' is 1 GiB; volumes only grow"),
    ]
    for args, message in cases:
        cp = daemon.splitctl(*args, check=False)
        assert cp.returncode == 1, cp
        one_line_error(cp, message)


def test_daemon_stopped(daemon):
    daemon.stop()
    cp = daemon.splitctl("status", check=False)
    assert cp.returncode == UNREACHABLE
    one_line_error(cp, "splitctl: cannot reach splitd at ")


def test_invalid_input_creates_nothing(daemon):
    for size in ("1000", "-1G", "1.5G", "0"):
        assert daemon.splitctl("volume", "create", "db", size, check=False).returncode == 2
    assert daemon.call("volume.list") == {"volumes": []}
    assert os.listdir(daemon.data_dir / "volumes") == []


def test_delete_refused_while_an_nbd_client_is_connected(daemon):
    nbd = pytest.importorskip("nbd")
    daemon.splitctl("volume", "create", "db", "64M")
    h = nbd.NBD()
    h.set_export_name("db")
    h.connect_uri(daemon.uri("db"))
    h.pwrite(b"x" * 4096, 0)
    wait_for(lambda: daemon.call("volume.show", name="db")["connections"] == 1)
    status = daemon.splitctl("status").stdout
    assert "connections: 1" in status
    assert status.splitlines()[-2].split()[:1] == ["EXPORT"]
    assert status.splitlines()[-1].split()[0] == "db"

    cp = daemon.splitctl("volume", "delete", "db", check=False)
    assert cp.returncode == 1
    assert "in use by 1 NBD connection" in one_line_error(cp, "splitctl: volume 'db'")
    cp = daemon.splitctl("volume", "delete", "db", "--json", check=False)
    assert "in use by 1 NBD connection" in json_error(cp, "conflict", 1)
    assert h.pread(4096, 0) == b"x" * 4096  # the client was left alone

    out = daemon.splitctl("volume", "delete", "db", "--force").stdout
    assert out == "deleted volume db, closed 1 connection\n"
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)
    assert daemon.call("volume.list") == {"volumes": []}


def test_volumes_survive_a_restart(daemon):
    daemon.splitctl("volume", "create", "a", "1G", "--region-size", "4K")
    daemon.splitctl("volume", "create", "b", "2G", "--read-only")
    before = daemon.call("volume.list")
    daemon.restart()
    assert daemon.call("volume.list") == before


# -- failures: exit statuses, messages ----------------------------------------------

UNREACHABLE = 4   # splitd could not be reached at all

EVERY_HELP = [[], ["status"], ["volume"], ["volume", "create"], ["volume", "list"],
              ["volume", "show"], ["volume", "resize"], ["volume", "delete"], ["pair"],
              ["pair", "create"], ["pair", "list"], ["pair", "show"], ["pair", "split"],
              ["pair", "resync"], ["pair", "restore"], ["pair", "delete"], ["pair", "set"],
              ["pair", "wait"], ["group"], ["group", "split"], ["group", "list"]]


@pytest.mark.parametrize("command", EVERY_HELP, ids=" ".join)
def test_help_lists_every_exit_status(command, tmp_path):
    cp = run_splitctl(*command, "--help", socket_path=str(tmp_path / "none"))
    statuses = cp.stdout.split("exit status:\n", 1)[1].split("\n\n", 1)[0]
    codes = [line.split()[0] for line in statuses.splitlines() if line[:3].strip().isdigit()]
    assert codes == ["0", "1", "2", "3", "4"], statuses
    assert "4  splitd could not be reached" in statuses


def json_error(cp: subprocess.CompletedProcess, code: str, status: int) -> str:
    """--json and a failure: exit `status`, one JSON object on stdout with the
    error's code and message, and the same message as one line on stderr."""
    assert cp.returncode == status, cp
    reply = json.loads(cp.stdout)
    assert list(reply) == ["error"] and sorted(reply["error"]) == ["code", "message"], reply
    assert reply["error"]["code"] == code, reply
    message = reply["error"]["message"]
    assert message and "\n" not in message
    assert cp.stderr.count("\n") == 1 and cp.stderr.startswith("splitctl: "), cp.stderr
    assert message in cp.stderr and "Traceback" not in cp.stderr
    return message


def test_json_errors_carry_the_code(daemon, tmp_path):
    daemon.splitctl("volume", "create", "db", "1G")
    # Refused by the daemon: its own code, exit 1.
    cp = daemon.splitctl("volume", "show", "nope", "--json", check=False)
    assert json_error(cp, "not-found", 1) == "no volume named 'nope'"
    cp = daemon.splitctl("--json", "volume", "create", "db", "1G", check=False)
    assert json_error(cp, "conflict", 1) == "volume 'db' already exists"
    cp = daemon.splitctl("volume", "resize", "db", "512M", "--json", check=False)
    assert "volumes only grow" in json_error(cp, "bad-input", 1)
    # Refused before anything is sent: bad-input, exit 2.
    cp = daemon.splitctl("volume", "create", "db2", "1000", "--json", check=False)
    assert "not a multiple of 4096" in json_error(cp, "bad-input", 2)
    assert cp.stderr.startswith("splitctl: error: ")
    cp = daemon.splitctl("--json", "pair", "create", "db", "db", check=False)
    assert "with itself" in json_error(cp, "bad-input", 2)
    cp = daemon.splitctl("volume", "list", "-x", "--json", check=False)
    assert "unrecognized option -x" in json_error(cp, "bad-input", 2)
    # No daemon there: unreachable, exit 4.
    cp = run_splitctl("status", "--json", socket_path=str(tmp_path / "none.sock"))
    assert json_error(cp, "unreachable", UNREACHABLE).startswith("cannot reach splitd at ")
    # Nothing was created by the refused commands.
    assert [v["name"] for v in daemon.call("volume.list")["volumes"]] == ["db"]


def _bound_but_not_listening(path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))   # what a killed daemon leaves behind
    s.close()


@pytest.mark.parametrize("kind, reason", [
    ("missing", "no such socket (is splitd running?)"),
    ("stale", "connection refused (is splitd running?)"),
    ("directory", "{path} is a directory, not a socket"),
    ("file", "{path} is a regular file, not a socket"),
])
def test_unreachable_daemon_exits_4_and_says_why(kind, reason, tmp_path):
    path = tmp_path / "admin.sock"
    if kind == "stale":
        _bound_but_not_listening(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "file":
        path.write_text("not a socket")
    cp = run_splitctl("--socket", str(path), "status", socket_path=str(tmp_path / "env.sock"))
    assert cp.returncode == UNREACHABLE, cp
    one_line_error(cp, f"splitctl: cannot reach splitd at {path}: {reason.format(path=path)}\n")


def test_permission_denied_is_unreachable(daemon):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run splitctl as another user")
    # pytest's base temporary directory is private to root: nobody cannot get
    # to the socket in it.
    cp = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                         str(BIN / "splitctl"), "--socket", str(daemon.admin_socket), "status"],
                        capture_output=True, text=True, timeout=60, check=False)
    assert cp.returncode == UNREACHABLE, cp
    one_line_error(cp, f"splitctl: cannot reach splitd at {daemon.admin_socket}: "
                       "permission denied")


@pytest.mark.parametrize("args", [["--socket", "", "status"], ["--socket=", "volume", "list"],
                                  ["volume", "list", "--socket", ""]])
def test_empty_socket_is_bad_input(args, daemon):
    # Not a fallback to $SPLITD_ADMIN_SOCKET (where a daemon does answer).
    cp = run_splitctl(*args, socket_path=str(daemon.admin_socket))
    assert cp.returncode == 2, cp
    assert "--socket" in one_line_error(cp, "splitctl: error: ")


@pytest.mark.parametrize("args, bad, command", [
    (["volume", "create", "-x", "1M"], "-x", "splitctl volume create"),
    (["volume", "create", "db", "1M", "-x"], "-x", "splitctl volume create"),
    (["volume", "create", "--bogus=1", "db", "1M"], "--bogus=1", "splitctl volume create"),
    (["volume", "list", "-x"], "-x", "splitctl volume list"),
    (["volume", "-x", "list"], "-x", "splitctl volume list"),
    (["volume", "-x"], "-x", "splitctl volume"),
    (["--socket", "/x", "-x"], "-x", "splitctl"),
    (["pair", "wait", "snap", "--until", "synced", "--tiemout", "5"], "--tiemout",
     "splitctl pair wait"),
])
def test_unknown_options_point_to_the_commands_help(args, bad, command, tmp_path):
    cp = run_splitctl(*args, socket_path=str(tmp_path / "none"))
    assert cp.returncode == 2, cp
    line = one_line_error(cp, "splitctl: error: unrecognized option ")
    assert line == f"splitctl: error: unrecognized option {bad} (see '{command} --help')\n"


def test_size_help_names_every_suffix_the_parser_takes(tmp_path):
    # 1E is a size the parser takes (and volume list prints EiB): the help says so.
    for command in (["volume", "create"], ["volume", "resize"]):
        out = run_splitctl(*command, "--help", socket_path=str(tmp_path / "none")).stdout
        assert "K/M/G/T/P/E suffix" in out, out
    out = run_splitctl("--help", socket_path=str(tmp_path / "none")).stdout
    assert "K, M, G, T, P or E" in " ".join(out.split())


def test_a_hundred_terabyte_volumes_are_cheap(daemon):
    for i in range(100):
        daemon.call("volume.create", name=f"vol{i:03d}", size="1T")
    started = time.monotonic()
    listed = daemon.call("volume.list")["volumes"]
    elapsed = time.monotonic() - started
    assert len(listed) == 100 and all(v["allocated"] == 0 for v in listed)
    assert elapsed < 0.1, f"volume.list took {elapsed * 1000:.0f} ms"
    assert rss_bytes(daemon.proc.pid) < 80 << 20
    out = daemon.splitctl("volume", "list").stdout
    assert out.count("1 TiB") == 100


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def test_splitctl_imports_no_daemon_machinery():
    # Most of a short splitctl command's time is interpreter start-up and
    # imports (the `volume list` target is 100 ms). asyncio and the pair layer
    # alone cost about 35 ms, and the CLI needs neither: it must stay a thin
    # client. A structural check, not a timing one.
    probe = ("import sys, splitctl.cli; "
             "print(' '.join(m for m in ('asyncio', 'controller.pair', 'sqlite3', 'uvloop') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", f"splitctl.cli imports {out}"
