"""splitctl pair and group commands against the real daemon.

Data goes in and out through real NBD clients (the libnbd `nbd` module);
progress output is checked on a real pseudo-terminal.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import struct
import subprocess
import termios
import time

import pytest

from splitctl import cli
from splitctl.client import (
    AdminClient,
    AdminError,
    PairFailed,
    WaitTimeout,
    target_reached,
)
from splitctl.commands import pair as pair_commands
from tests.conftest import BIN
from tests.splitctl.test_cli import one_line_error, run_splitctl

MiB = 1 << 20


def connect(daemon, export: str):
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_uri(daemon.uri(export))
    return h


def write_pattern(daemon, export: str, pattern: bytes, offset: int, length: int) -> None:
    h = connect(daemon, export)
    h.pwrite(pattern * (length // len(pattern)), offset)
    h.flush()
    h.shutdown()


def read(daemon, export: str, offset: int, length: int) -> bytes:
    h = connect(daemon, export)
    data = h.pread(length, offset)
    h.shutdown()
    return data


def show(daemon, pair: str) -> dict:
    return json.loads(daemon.splitctl("pair", "show", pair, "--json").stdout)


def wait(daemon, pair: str, until: str, *extra: str) -> subprocess.CompletedProcess:
    return daemon.splitctl("pair", "wait", pair, "--until", until, "--interval", "0.1",
                           "--timeout", "50", *extra)


def refused(daemon, *args: str, prefix: str = "splitctl: ") -> str:
    """The command exits 1 with one line on stderr; returns that line."""
    cp = daemon.splitctl(*args, check=False)
    assert cp.returncode == 1, (args, cp)
    return one_line_error(cp, prefix)


# -- help --------------------------------------------------------------------

HELP = {
    ("pair",): ["create", "wait", "split", "resync", "restore", "pair states:"],
    ("pair", "create"): ["PRIMARY", "SECONDARY", "--create-secondary", "--read-policy",
                         "copy-on-read", "staging", "wait", "--rate", "--group",
                         "splitctl pair create db db-snap --create-secondary"],
    ("pair", "list"): ["--json", "splitctl pair list"],
    ("pair", "show"): ["PAIR", "--json", "splitctl pair show db-snap"],
    ("pair", "split"): ["PAIR", "splitctl pair split db-snap"],
    ("pair", "resync"): ["PAIR", "splitctl pair resync db-snap"],
    ("pair", "restore"): ["PAIR", "splitctl pair restore db-snap"],
    ("pair", "delete"): ["PAIR", "--force", "splitctl pair delete db-snap"],
    ("pair", "set"): ["PAIR", "--rate", "--read-policy", "unlimited",
                      "splitctl pair set db-snap --rate 50M"],
    ("pair", "wait"): ["PAIR", "--until", "synced", "copied", "--timeout", "--interval",
                       "progress bar", "3  pair wait",
                       "splitctl pair wait db-snap --until synced"],
    ("group",): ["split", "list", "splitctl group split prod"],
    ("group", "split"): ["NAME", "splitctl group split prod"],
    ("group", "list"): ["--json", "splitctl group list"],
}


@pytest.mark.parametrize("command", sorted(HELP), ids=" ".join)
def test_help_names_every_option_and_has_examples(command, tmp_path):
    cp = run_splitctl(*command, "--help", socket_path=str(tmp_path / "none"))
    assert cp.returncode == 0 and cp.stderr == ""
    assert cp.stdout.startswith(f"usage: splitctl {' '.join(command)}")
    examples = cp.stdout.split("examples:\n", 1)[1]
    assert examples.startswith(f"  splitctl {command[0]}")
    for word in HELP[command]:
        assert word in cp.stdout, word
    assert "\\n" not in cp.stdout


def test_top_level_help_lists_pair_and_group(tmp_path):
    out = run_splitctl("--help", socket_path=str(tmp_path / "none")).stdout
    assert "    pair " in out and "    group " in out and "splitctl pair create" in out


# -- command lines refused before anything is sent (exit 2) -------------------

@pytest.mark.parametrize("args, reason", [
    (["pair", "create", "db", "db"], "cannot pair volume 'db' with itself"),
    (["pair", "create", "db", "snap", "--read-policy", "lazy"], "invalid choice: 'lazy'"),
    (["pair", "create", "db", "snap", "--rate", "fast"], "invalid rate 'fast'"),
    (["pair", "create", "db", "snap", "--rate=-1M"], "invalid rate '-1M'"),
    (["pair", "create", "db", "snap", "--rate", "1.5M"], "invalid rate '1.5M'"),
    (["pair", "create", "db", "../snap"], "invalid volume name"),
    (["pair", "create", "db", "snap", "--group", "a/b"], "invalid volume name"),
    (["pair", "create", "db"], "required: SECONDARY"),
    (["pair", "set", "snap"], "nothing to set: give --rate, --read-policy or both"),
    (["pair", "set", "snap", "--rate", "10Q"], "invalid rate '10Q'"),
    (["pair", "set", "snap", "--read-policy", "eager"], "invalid choice: 'eager'"),
    (["pair", "show", "a b"], "invalid volume name"),
    (["pair", "wait", "snap"], "required: --until"),
    (["pair", "wait", "snap", "--until", "done"], "invalid choice: 'done'"),
    (["pair", "wait", "snap", "--until", "synced", "--timeout", "soon"], "invalid timeout"),
    (["pair", "wait", "snap", "--until", "synced", "--timeout", "-5"], "0 or more seconds"),
    (["pair", "wait", "snap", "--until", "synced", "--interval", "0"], "more than 0 seconds"),
    (["pair", "frobnicate"], "invalid choice"),
    (["group", "split"], "required: NAME"),
    (["group", "split", "a b"], "invalid volume name"),
])
def test_bad_command_lines_exit_2_in_one_line(args, reason, tmp_path):
    cp = run_splitctl(*args, socket_path=str(tmp_path / "none"))
    assert cp.returncode == 2, cp
    assert reason in one_line_error(cp, "splitctl: error: ")


def test_duration_and_rate_parsing():
    assert cli.parse_duration("90s") == 90 and cli.parse_duration("10m") == 600
    assert cli.parse_duration("1.5h") == 5400 and cli.parse_duration("0") == 0
    assert cli._rate("100M") == 100 * MiB and cli._rate("0") == 0 and cli._rate("4096") == 4096


# -- the daemon refuses (exit 1) -------------------------------------------------

def test_daemon_refusals_exit_1_in_one_line(daemon):
    daemon.create_volume("db", "64M")
    daemon.create_volume("big", "128M")
    daemon.create_volume("other", "64M")
    for args in (["pair", "show", "nope"], ["pair", "split", "nope"], ["pair", "resync", "nope"],
                 ["pair", "restore", "nope"], ["pair", "delete", "nope"],
                 ["pair", "set", "nope", "--rate", "1M"],
                 ["pair", "wait", "nope", "--until", "synced"]):
        assert "no pair named 'nope'" in refused(daemon, *args)
    assert "sizes differ: primary 'db' is 64 MiB" in refused(daemon, "pair", "create", "db", "big")
    assert "no volume named 'nope'" in refused(daemon, "pair", "create", "nope", "other")
    line = refused(daemon, "pair", "create", "db", "missing")
    assert "no volume named 'missing'" in line and "--create-secondary" in line
    assert "exists already" in refused(daemon, "pair", "create", "db", "other",
                                       "--create-secondary")
    assert "no pairs in group 'nope'" in refused(daemon, "group", "split", "nope")

    daemon.splitctl("pair", "create", "db", "snap", "--create-secondary")
    assert wait(daemon, "snap", "synced").returncode == 0
    assert "already the secondary" in refused(daemon, "pair", "create", "db", "snap")
    assert "cannot resync" in refused(daemon, "pair", "resync", "snap")
    assert "cannot restore" in refused(daemon, "pair", "restore", "snap")
    assert "is in pair 'snap'" in refused(daemon, "volume", "delete", "db")
    # Nothing was created or changed by the refusals.
    assert [p["name"] for p in daemon.call("pair.list")["pairs"]] == ["snap"]
    assert sorted(v["name"] for v in daemon.call("volume.list")["volumes"]) == \
        ["big", "db", "other", "snap"]


# -- the life cycle --------------------------------------------------------------

def test_life_cycle(daemon):
    daemon.create_volume("db", "64M")
    write_pattern(daemon, "db", b"old!", 0, 1 * MiB)

    out = daemon.splitctl("pair", "create", "db", "snap", "--create-secondary").stdout
    assert out == ("created pair snap: db -> snap, state copy, 16 of 1024 regions to copy "
                   "(read policy copy-on-read, rate unlimited)\n")
    cp = wait(daemon, "snap", "synced")
    assert cp.returncode == 0 and cp.stderr == ""     # no terminal, quick: no progress lines
    assert cp.stdout == "pair snap is synced: snap mirrors db (state pair)\n"
    shown = show(daemon, "snap")
    assert (shown["state"], shown["remaining"], shown["copied_regions"]) == ("pair", 0, 16)

    # Split: the secondary is db's image at this moment, whatever db does next.
    out = daemon.splitctl("pair", "split", "snap").stdout
    assert out.startswith("split pair snap: snap is now db's image at the split; ")
    shown = show(daemon, "snap")
    assert shown["state"] == "split" and shown["split_at"] is not None
    write_pattern(daemon, "db", b"new!", 0, 1 * MiB)
    assert read(daemon, "snap", 0, MiB) == b"old!" * (MiB // 4)
    assert read(daemon, "db", 0, MiB) == b"new!" * (MiB // 4)
    write_pattern(daemon, "snap", b"S", 4 * MiB, 64 * 1024)    # a secondary write

    text = daemon.splitctl("pair", "show", "snap").stdout
    assert "state:         split\n" in text
    assert "pending:       0 regions (0 B)" in text
    assert "changed:       16 regions on the primary, 1 on the secondary since the split" in text
    for key in ("progress:", "copy rate:", "ETA:", "copy-on-write:", "copy-on-read:",
                "split at:"):
        assert f"\n{key}" in text, key
    lines = daemon.splitctl("pair", "list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "PRIMARY", "SECONDARY", "STATE", "REMAINING", "RATE",
                                "GROUP"]
    assert lines[1].split() == ["snap", "db", "snap", "split", "0", "unlimited", "-"]

    # Resync: the 17 changed regions go db -> snap; snap's own write is lost.
    out = daemon.splitctl("pair", "resync", "snap").stdout
    assert out.startswith("resyncing pair snap: 17 regions (1.1 MiB) to copy db -> snap")
    assert wait(daemon, "snap", "synced").returncode == 0
    assert show(daemon, "snap")["state"] == "pair"
    daemon.splitctl("pair", "split", "snap")
    assert read(daemon, "snap", 0, MiB) == b"new!" * (MiB // 4)
    assert read(daemon, "snap", 4 * MiB, 4096) == bytes(4096)

    # Restore: db goes back to snap's image, db's writes since the split are lost.
    write_pattern(daemon, "db", b"bad!", 0, 256 * 1024)
    write_pattern(daemon, "snap", b"T", 8 * MiB, 64 * 1024)
    out = daemon.splitctl("pair", "restore", "snap").stdout
    assert out.startswith("restoring pair snap: 5 regions (320 KiB) to copy snap -> db")
    cp = wait(daemon, "snap", "synced", "--json")
    assert cp.returncode == 0
    assert json.loads(cp.stdout)["state"] == "pair"
    assert read(daemon, "db", 0, MiB) == b"new!" * (MiB // 4)
    assert read(daemon, "db", 8 * MiB, 64 * 1024) == b"T" * (64 * 1024)

    out = daemon.splitctl("pair", "delete", "snap").stdout
    assert out == "deleted pair snap (was pair); both volumes are kept\n"
    assert daemon.splitctl("pair", "list").stdout == "no pairs\n"
    assert sorted(v["name"] for v in daemon.call("volume.list")["volumes"]) == ["db", "snap"]


def test_json_on_every_pair_command(daemon):
    daemon.create_volume("db", "64M")
    created = json.loads(daemon.splitctl("pair", "create", "db", "snap", "--create-secondary",
                                         "--rate", "100M", "--read-policy", "staging",
                                         "--group", "g", "--json").stdout)
    assert (created["name"], created["primary"], created["rate"], created["read_policy"],
            created["group"]) == ("snap", "db", 100 * MiB, "staging", "g")
    assert json.loads(wait(daemon, "snap", "synced", "--json").stdout)["state"] == "pair"
    listed = json.loads(daemon.splitctl("pair", "list", "--json").stdout)
    assert [p["name"] for p in listed["pairs"]] == ["snap"]
    assert json.loads(daemon.splitctl("--json", "group", "list").stdout) == \
        {"groups": [{"name": "g", "pairs": ["snap"]}]}
    changed = json.loads(daemon.splitctl("pair", "set", "snap", "--rate", "0", "--read-policy",
                                         "wait", "--json").stdout)
    assert (changed["rate"], changed["read_policy"]) == (0, "wait")
    split = json.loads(daemon.splitctl("pair", "split", "snap", "--json").stdout)
    assert split["state"] == "split"
    resync = json.loads(daemon.splitctl("pair", "resync", "snap", "--json").stdout)
    assert resync["state"] in ("resync", "pair")
    assert wait(daemon, "snap", "synced").returncode == 0
    daemon.splitctl("pair", "split", "snap")
    restore = json.loads(daemon.splitctl("pair", "restore", "snap", "--json").stdout)
    assert restore["state"] in ("restore", "pair")
    assert wait(daemon, "snap", "synced").returncode == 0
    deleted = json.loads(daemon.splitctl("pair", "delete", "snap", "--json").stdout)
    assert deleted == {"name": "snap", "deleted": True, "state_was": "pair"}


def test_set_changes_rate_and_policy(daemon):
    daemon.create_volume("db", "64M")
    daemon.splitctl("pair", "create", "db", "snap", "--create-secondary")
    assert daemon.splitctl("pair", "set", "snap", "--rate", "100M").stdout == \
        "pair snap: rate 100 MiB/s, read policy copy-on-read\n"
    assert daemon.splitctl("pair", "set", "snap", "--read-policy", "staging").stdout == \
        "pair snap: rate 100 MiB/s, read policy staging\n"
    assert daemon.splitctl("pair", "set", "snap", "--rate", "0").stdout == \
        "pair snap: rate unlimited, read policy staging\n"
    assert daemon.call("pair.show", name="snap")["rate"] == 0


def test_resync_of_an_unchanged_split_gets_synced(daemon):
    # Nothing to copy is still a drain that has to end in `pair`.
    daemon.create_volume("db", "64M")
    daemon.splitctl("pair", "create", "db", "snap", "--create-secondary")   # empty primary
    assert wait(daemon, "snap", "synced").returncode == 0
    daemon.splitctl("pair", "split", "snap")
    assert daemon.splitctl("pair", "resync", "snap").stdout.startswith(
        "resyncing pair snap: 0 regions (0 B) to copy")
    cp = wait(daemon, "snap", "synced", "--timeout", "5")
    assert cp.returncode == 0, cp
    daemon.splitctl("pair", "split", "snap")
    daemon.splitctl("pair", "restore", "snap")
    cp = wait(daemon, "snap", "synced", "--timeout", "5")
    assert cp.returncode == 0, cp


# -- waiting -----------------------------------------------------------------------

def slow_pair(daemon, rate: str, data: int = 4 * MiB, name: str = "snap") -> None:
    """db (64 MiB, `data` bytes written) paired with a new `name` at `rate`."""
    daemon.create_volume("db", "64M")
    write_pattern(daemon, "db", b"data", 0, data)
    daemon.splitctl("pair", "create", "db", name, "--create-secondary", "--rate", rate)


def test_wait_times_out_with_exit_3(daemon):
    slow_pair(daemon, "4096")          # 64 regions at 4 KiB/s: many minutes
    started = time.monotonic()
    cp = daemon.splitctl("pair", "wait", "snap", "--until", "synced", "--timeout", "1",
                         "--interval", "0.2", check=False)
    assert cp.returncode == 3, cp
    assert time.monotonic() - started < 10
    line = one_line_error(cp, "splitctl: timed out after 1s waiting for pair 'snap' to be "
                              "synced: state copy, ")
    assert line.endswith(" regions still to copy\n")

    # --json: the last pair.show on stdout with the error in it, the message on stderr.
    cp = daemon.splitctl("pair", "wait", "snap", "--until", "copied", "--timeout", "0.3",
                         "--json", check=False)
    assert cp.returncode == 3
    last = json.loads(cp.stdout)
    assert last["state"] == "copy" and last["remaining"] > 0
    assert cp.stderr.startswith("splitctl: timed out after 0.3s")
    assert last["error"]["code"] == "timeout"
    assert cp.stderr == f"splitctl: {last['error']['message']}\n"

    # Split: pending regions are copied at the same crawl.
    daemon.splitctl("pair", "split", "snap")
    cp = daemon.splitctl("pair", "wait", "snap", "--until", "copied", "--timeout", "0.5",
                         check=False)
    assert cp.returncode == 3
    one_line_error(cp, "splitctl: timed out after 0.5s waiting for pair 'snap' to be copied: "
                       "state split, ")
    assert "not yet copied" in refused(daemon, "pair", "delete", "snap")

    # Lift the limit: the copy finishes.
    daemon.splitctl("pair", "set", "snap", "--rate", "0")
    cp = wait(daemon, "snap", "copied")
    assert cp.returncode == 0, cp
    assert cp.stdout == "pair snap is copied: nothing left to copy (state split)\n"
    assert read(daemon, "snap", 0, 4 * MiB) == b"data" * MiB


def test_wait_until_synced_on_a_split_pair_waits_for_a_resync(daemon):
    daemon.create_volume("db", "64M")
    daemon.splitctl("pair", "create", "db", "snap", "--create-secondary")
    assert wait(daemon, "snap", "synced").returncode == 0
    daemon.splitctl("pair", "split", "snap")
    cp = daemon.splitctl("pair", "wait", "snap", "--until", "synced", "--timeout", "0.5",
                         check=False)
    assert cp.returncode == 3, cp
    assert "state split" in cp.stderr, cp


def test_wait_stops_when_the_pair_goes_to_error(daemon):
    daemon.create_volume("db", "64M")
    write_pattern(daemon, "db", b"data", 0, MiB)
    daemon.splitctl("pair", "create", "db", "snap", "--create-secondary")
    wait(daemon, "snap", "synced")
    # Bitmaps lost across a restart: the pair cannot vouch for snap any more.
    daemon.stop()
    for entry in (daemon.data_dir / "pairs" / "snap").iterdir():
        entry.unlink()
    daemon.start()
    shown = show(daemon, "snap")
    assert shown["state"] == "error" and shown["reason"]

    cp = daemon.splitctl("pair", "wait", "snap", "--until", "synced", "--timeout", "30",
                         check=False)
    assert cp.returncode == 1
    line = one_line_error(cp, "splitctl: pair 'snap' went to state error: ")
    assert shown["reason"] in line
    cp = daemon.splitctl("pair", "wait", "snap", "--until", "synced", "--json", check=False)
    assert cp.returncode == 1 and json.loads(cp.stdout)["state"] == "error"
    assert json.loads(cp.stdout)["error"]["code"] == "pair-error"
    assert f"state:         error ({shown['reason']})" in daemon.splitctl("pair", "show",
                                                                           "snap").stdout
    assert daemon.splitctl("pair", "list").stdout.splitlines()[1].split()[3] == "error"

    # Only a full resync leaves error: every region is copied again.
    out = daemon.splitctl("pair", "resync", "snap").stdout
    assert out.startswith("resyncing pair snap: 1024 regions (64 MiB) to copy")
    assert wait(daemon, "snap", "synced").returncode == 0
    daemon.splitctl("pair", "split", "snap")
    assert read(daemon, "snap", 0, MiB) == b"data" * (MiB // 4)


def run_on_terminal(daemon, *args: str, columns: int = 120, timeout: float = 60):
    """Run splitctl with stderr on a pseudo-terminal; (exit status, stdout,
    what the terminal received)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = dict(os.environ, SPLITD_ADMIN_SOCKET=str(daemon.admin_socket))
    env.pop("COLUMNS", None)
    proc = subprocess.Popen([str(BIN / "splitctl"), *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:      # EIO: the last holder of the terminal closed it
                break
            if not chunk:
                break
            seen += chunk
        stdout, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stdout.decode(), seen.decode()


def test_wait_draws_a_progress_bar_on_a_terminal(daemon):
    slow_pair(daemon, "1M", data=3 * MiB)      # 48 regions at 1 MiB/s: about 3 s
    rc, stdout, terminal = run_on_terminal(daemon, "pair", "wait", "snap", "--until", "synced",
                                           "--interval", "0.2")
    assert rc == 0, terminal
    assert stdout == "pair snap is synced: snap mirrors db (state pair)\n"
    frames = [f for f in terminal.replace("\r\n", "\n").split("\r") if f]
    assert len(frames) >= 5, terminal          # redrawn in place, not line after line
    for frame in frames:
        body = frame.replace("\x1b[K", "").rstrip("\n")
        assert body.startswith("snap "), frame
        assert len(body) < 120
        assert " regions " in body and "%" in body and "/s ETA " in body
    assert "[" in frames[0] and "]" in frames[0]
    assert all(f.endswith("\x1b[K") for f in frames[:-1])
    assert " 0/48 regions " in frames[0] or " copy " in frames[0]
    assert "48/48 regions 100.0%" in frames[-1] and "snap pair " in frames[-1]
    assert terminal.endswith("\n")              # the last bar is kept, the line ended
    assert any(" copy [" in f and "ETA " in f and "ETA -" not in f for f in frames[1:-1])


def test_wait_on_a_narrow_terminal_drops_the_bar(daemon):
    daemon.create_volume("db", "64M")
    daemon.splitctl("pair", "create", "db", "snap", "--create-secondary")
    rc, _, terminal = run_on_terminal(daemon, "pair", "wait", "snap", "--until", "synced",
                                      columns=40)
    assert rc == 0
    frame = terminal.replace("\r\n", "\n").split("\r")[-1].replace("\x1b[K", "").strip()
    assert len(frame) < 40 and "[" not in frame and frame.startswith("snap pair ")


def test_wait_errors_on_a_terminal_come_below_the_bar(daemon):
    slow_pair(daemon, "4096")
    rc, stdout, terminal = run_on_terminal(daemon, "pair", "wait", "snap", "--until", "synced",
                                           "--timeout", "0.5", "--interval", "0.1")
    assert rc == 3 and stdout == ""
    bar, message = terminal.replace("\r\n", "\n").rstrip("\n").rsplit("\n", 1)
    assert "snap copy [" in bar
    assert message.startswith("splitctl: timed out after 0.5s")


def test_wait_without_a_terminal_prints_a_line_now_and_then(daemon, monkeypatch, capsys):
    slow_pair(daemon, "1M", data=2 * MiB)
    monkeypatch.setattr(pair_commands, "QUIET_REPORT_EVERY", 0.3)
    rc = cli.main(["--socket", str(daemon.admin_socket), "pair", "wait", "snap", "--until",
                   "synced", "--interval", "0.1"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out == "pair snap is synced: snap mirrors db (state pair)\n"
    lines = err.splitlines()
    assert len(lines) >= 2 and "\r" not in err and "\x1b" not in err
    for line in lines:
        assert line.startswith("splitctl: waiting for pair snap to be synced: copy, "), line
        assert "/32 regions (" in line and "%), " in line and "/s, ETA " in line


# -- groups ------------------------------------------------------------------------

def test_group_split_splits_every_pair_at_one_point(daemon):
    for vol in ("db", "logs", "solo"):
        daemon.create_volume(vol, "64M")
        write_pattern(daemon, vol, vol[:1].encode(), 0, 64 * 1024)
    daemon.splitctl("pair", "create", "db", "db-snap", "--create-secondary", "--group", "prod")
    daemon.splitctl("pair", "create", "logs", "logs-snap", "--create-secondary", "--group",
                    "prod")
    daemon.splitctl("pair", "create", "solo", "solo-snap", "--create-secondary")
    for pair in ("db-snap", "logs-snap", "solo-snap"):
        assert wait(daemon, pair, "synced").returncode == 0

    assert daemon.splitctl("group", "list").stdout == \
        "GROUP  PAIRS\nprod   db-snap, logs-snap\n"
    rows = [line.split() for line in daemon.splitctl("pair", "list").stdout.splitlines()[1:]]
    assert [(r[0], r[-1]) for r in rows] == [("db-snap", "prod"), ("logs-snap", "prod"),
                                             ("solo-snap", "-")]

    out = daemon.splitctl("group", "split", "prod").stdout.splitlines()
    assert out[0] == "split group prod: 2 pairs at one single point"
    assert out[1].split() == ["NAME", "PRIMARY", "SECONDARY", "TO", "COPY", "SPLIT", "GEN",
                              "DELTA", "BASE"]
    assert [line.split()[0] for line in out[2:]] == ["db-snap", "logs-snap"]
    states = {p["name"]: p for p in daemon.call("pair.list")["pairs"]}
    assert states["db-snap"]["state"] == states["logs-snap"]["state"] == "split"
    assert states["db-snap"]["split_at"] == states["logs-snap"]["split_at"]
    assert states["solo-snap"]["state"] == "pair"

    # Split again: refused as a whole.
    assert "cannot split" in refused(daemon, "group", "split", "prod")
    daemon.splitctl("pair", "resync", "db-snap")
    assert wait(daemon, "db-snap", "synced").returncode == 0
    assert "cannot split" in refused(daemon, "group", "split", "prod")
    assert show(daemon, "db-snap")["state"] == "pair"

    daemon.splitctl("pair", "resync", "logs-snap")
    assert wait(daemon, "logs-snap", "synced").returncode == 0
    result = json.loads(daemon.splitctl("group", "split", "prod", "--json").stdout)
    assert result["group"] == "prod" and [p["state"] for p in result["pairs"]] == ["split"] * 2


def test_group_list_empty(daemon):
    assert daemon.splitctl("group", "list").stdout == "no groups\n"
    assert json.loads(daemon.splitctl("group", "list", "--json").stdout) == {"groups": []}


def test_delete_force_while_copying(daemon):
    slow_pair(daemon, "4096")
    daemon.splitctl("pair", "split", "snap")
    assert "not yet copied" in refused(daemon, "pair", "delete", "snap")
    out = daemon.splitctl("pair", "delete", "snap", "--force").stdout
    assert out == "deleted pair snap (was split); both volumes are kept\n"
    assert daemon.call("pair.list") == {"pairs": []}


# -- AdminClient.wait_pair, without a daemon -----------------------------------------

class ScriptedClient(AdminClient):
    """pair.show answers from a list; time is fake and moves only in sleep()."""

    def __init__(self, states: list[dict]):
        super().__init__("/nowhere")
        self.states = states
        self.now = 0.0
        self.sleeps: list[float] = []

    def call(self, method: str, **params):
        assert (method, params) == ("pair.show", {"name": "snap"})
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def wait(self, until: str, timeout=None, interval=1.0, seen=None):
        return self.wait_pair("snap", until, timeout, interval, on_poll=seen,
                              clock=lambda: self.now, sleep=self.sleep)


def pair_state(state: str, remaining: int, reason: str = "") -> dict:
    return {"name": "snap", "state": state, "remaining": remaining, "reason": reason}


def test_wait_pair_targets():
    assert target_reached(pair_state("pair", 3), "synced")
    assert not target_reached(pair_state("resync", 0), "synced")
    assert target_reached(pair_state("split", 0), "copied")
    assert target_reached(pair_state("pair", 0), "copied")
    assert not target_reached(pair_state("split", 1), "copied")
    assert not target_reached(pair_state("restore", 0), "copied")
    with pytest.raises(ValueError):
        target_reached(pair_state("pair", 0), "done")


def test_wait_pair_polls_until_there():
    client = ScriptedClient([pair_state("copy", 5), pair_state("copy", 2), pair_state("pair", 0)])
    seen = []
    assert client.wait("synced", interval=0.5, seen=seen.append)["state"] == "pair"
    assert [p["remaining"] for p in seen] == [5, 2, 0] and client.sleeps == [0.5, 0.5]


def test_wait_pair_timeout_never_oversleeps():
    client = ScriptedClient([pair_state("split", 7)])
    with pytest.raises(WaitTimeout) as e:
        client.wait("copied", timeout=2.5, interval=1.0)
    assert client.sleeps == [1.0, 1.0, 0.5] and client.now == 2.5
    assert e.value.code == "timeout" and e.value.pair["remaining"] == 7
    assert e.value.message == ("timed out after 2.5s waiting for pair 'snap' to be copied: "
                               "state split, 7 regions still to copy")
    client = ScriptedClient([pair_state("split", 7)])
    with pytest.raises(WaitTimeout):
        client.wait("copied", timeout=0)
    assert client.sleeps == []


def test_wait_pair_stops_on_error():
    client = ScriptedClient([pair_state("copy", 5), pair_state("error", 5, "disk on fire")])
    with pytest.raises(PairFailed) as e:
        client.wait("synced")
    assert e.value.message == "pair 'snap' went to state error: disk on fire"
    assert isinstance(e.value, AdminError) and e.value.pair["state"] == "error"


def test_wait_without_a_terminal_prints_no_waiting_line_once_nothing_remains(monkeypatch):
    """The poll that ends the wait (nothing remaining, the drain done) is
    not reported as still waiting, however long since the last line: the
    outcome line follows it. (Under load the last poll often came due.)"""
    monkeypatch.setattr(pair_commands, "QUIET_REPORT_EVERY", 0.0)
    out = io.StringIO()
    display = pair_commands.WaitDisplay(out, "synced")
    status = {"name": "snap", "state": "copy", "remaining": 4, "copy_rate": 1 << 20,
              "eta_s": 1, "regions": 32, "progress": {"done": 28, "total": 32}}
    display.update(status)
    display.update(dict(status, state="pair", remaining=0, progress={"done": 0, "total": 0}))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and ": copy, " in lines[0], lines
