"""prepare: the coordinated split across three hosts (network namespaces,
harness/site.py), with a writer running on the application host's ext4:
PREPARE_ROUNDS (default 100) prepares of a 1 GiB and of a 1 TiB (sparse)
volume, asked from the backup host over TCP with TLS and a token, each on a
connection of its own. Figures: the freeze window the agent reports (FIFREEZE
to FITHAW) p50/p99/max, target p99 < 50 ms; `prepare` end to end (connect,
TLS, token, prepare, answer) p50/p99, target p99 < 250 ms. Between two
prepares (not timed) the pair is resynced, from the backup host too.

Needs root (namespaces, loop devices, mount, FIFREEZE) and /dev/fuse; skipped
otherwise. Data on tmpfs (/dev/shm).

The timed loop runs in a process of its own inside the backup namespace:
this file run as a script, `prepare.py drive ...` (see drive()).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

if __name__ != "__main__":
    from benchkit import BenchError, Context, Section, percentile, verdict

WINDOW_P99_TARGET_MS = 50.0
PREPARE_P99_TARGET_MS = 250.0
CLI_ROUNDS = 5
SIZES = (("1 GiB", 1 << 30), ("1 TiB", 1 << 40))
TOOLS = ("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "mount", "umount", "nbdcopy",
         "openssl", "nsenter")


def rounds() -> int:
    return max(1, int(os.environ.get("PREPARE_ROUNDS") or 100))


# -- the timed loop, in the backup namespace -------------------------------------------------

def drive(argv: list[str]) -> int:
    """PREPARE_ROUNDS x (prepare timed, pair.resync); one JSON line per prepare
    on stdout: {"e2e_ms", "window_ms", "freeze_ms", "agent_ms", "split_gen", "expedited"}."""
    # The agent speaks the daemon's remote admin protocol (splitctl's
    # HostAgentClient is this client with other words in its errors).
    from splitctl.client import RemoteAdminClient

    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", required=True)
    ap.add_argument("--agent-token", required=True)
    ap.add_argument("--daemon", required=True)
    ap.add_argument("--daemon-token", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--pair", required=True)
    ap.add_argument("--rounds", type=int, required=True)
    args = ap.parse_args(argv)
    agent_secret = Path(args.agent_token).read_text()
    with RemoteAdminClient(args.daemon, Path(args.daemon_token).read_text(), args.ca,
                           timeout=60) as daemon:
        for _ in range(args.rounds):
            if daemon.call("pair.show", name=args.pair)["state"] == "split":
                daemon.call("pair.resync", name=args.pair)
            started = time.perf_counter()
            with RemoteAdminClient(args.agent, agent_secret, args.ca, timeout=60) as agent:
                answer = agent.call("prepare", directory=args.dir, port="backup")
            e2e = (time.perf_counter() - started) * 1000
            print(json.dumps({"e2e_ms": round(e2e, 3), "window_ms": answer["window_ms"],
                              "freeze_ms": answer["freeze_ms"],
                              "agent_ms": answer["prepare_ms"],
                              "split_gen": answer.get("split_gen"),
                              "expedited": answer.get("expedited")}), flush=True)
    return 0


# -- the section -----------------------------------------------------------------------------

def one_size(ctx: Context, label: str, size: int, n: int) -> dict:
    from harness.site import AGENT_PORT, Site
    from harness.writer import records

    base = ctx.tempdir("/dev/shm", "splitd-bench-prepare.")
    site = Site(base)
    ctx.defer(f"site in {base}", lambda: _close(site))
    site.start()
    d = site.daemon
    assert d is not None
    ctx.note(f"{label}: ext4 on the primary")
    # Few inodes, a small journal, nothing left to lazy init: mkfs writes
    # ~100 MiB even for 1 TiB, and no background zeroing runs during the bench.
    site.ext4_pair("db", "db-snap", size, ("-N", "4096", "-J", "size=64", "-E",
                                           "lazy_itable_init=0,lazy_journal_init=0,nodiscard"),
                   sync_timeout=600)
    state = base / "agent"
    mnt = base / "mnt"
    mnt.mkdir()
    ctx.note(f"{label}: attach, mount, serve")
    site.attach_primary(state, "db", mnt)
    ctx.defer("detach db", lambda: _detach(site, state))
    served = site.serve_agent(state)
    ctx.defer("splitd-host serve", lambda: site.net.stop(served, timeout=15))
    agent_token = site.agent_token(state, "bench", "prepare")
    resync_token = site.daemon_token("bench-resync", "admin")
    log = base / "writer.log"
    writer = site.writer(mnt / "data", log, "--keep", "200")
    ctx.defer("writer", lambda: site.net.stop(writer, timeout=15))

    ctx.note(f"{label}: {n} prepares")
    here = Path(__file__).resolve()
    env = dict(site.env, PYTHONPATH=f"{site.env['PYTHONPATH']}:{here.parent.parent}")
    t0 = time.monotonic()
    cp = site.net.run("backup", [sys.executable, str(here), "drive",
                                 "--agent", f"tcp://{site.app_addr}:{AGENT_PORT}",
                                 "--agent-token", str(agent_token),
                                 "--daemon", site.admin_uri("backup"),
                                 "--daemon-token", str(resync_token), "--ca", str(site.ca),
                                 "--dir", str(mnt / "data"), "--pair", "db-snap",
                                 "--rounds", str(n)], env=env, timeout=60 + 30 * n)
    wall = time.monotonic() - t0
    if cp.returncode != 0:
        raise BenchError(f"{label}: the prepare driver failed: {cp.stderr.strip()[-2000:]}")
    rows = [json.loads(line) for line in cp.stdout.splitlines()]
    # The command line as an operator types it, Python's start-up included
    # (information, no target).
    cli_ms = []
    for _ in range(CLI_ROUNDS):
        if d.call("pair.show", name="db-snap")["state"] == "split":
            d.call("pair.resync", name="db-snap")
        started = time.perf_counter()
        done = site.backup_prepare(mnt / "data", agent_token, timeout=120)
        cli_ms.append((time.perf_counter() - started) * 1000)
        if done.returncode != 0:
            raise BenchError(f"{label}: splitctl backup prepare failed: {done.stderr.strip()}")
    written = len(records(str(log)))
    windows = [r["window_ms"] for r in rows]
    e2e = [r["e2e_ms"] for r in rows]
    return {"size": size, "rounds": len(rows), "wall_s": round(wall, 1),
            "files_written": written,
            "window_p50_ms": percentile(windows, 50), "window_p99_ms": percentile(windows, 99),
            "window_max_ms": max(windows),
            "freeze_p50_ms": percentile([r["freeze_ms"] for r in rows], 50),
            "freeze_p99_ms": percentile([r["freeze_ms"] for r in rows], 99),
            "split_p50_ms": percentile([r["window_ms"] - r["freeze_ms"] for r in rows], 50),
            "expedited": sum(1 for r in rows if r.get("expedited")),
            "e2e_p50_ms": round(percentile(e2e, 50), 1), "e2e_p99_ms": round(percentile(e2e, 99), 1),
            "e2e_max_ms": round(max(e2e), 1),
            "agent_p50_ms": percentile([r["agent_ms"] for r in rows], 50),
            "cli_p50_ms": round(percentile(cli_ms, 50), 1),
            "targets": {"window_p99": percentile(windows, 99) < WINDOW_P99_TARGET_MS,
                        "e2e_p99": percentile(e2e, 99) < PREPARE_P99_TARGET_MS},
            "prepares": rows}


def _detach(site, state: Path) -> None:
    cp = site.agent("app", state, "detach", "db", check=False)
    if cp.returncode != 0:
        raise BenchError(f"splitd-host detach db failed: {cp.stderr.strip()}")


def _close(site) -> None:
    left = site.close()
    if left:
        print(f"  note: the site left behind: {left}", file=sys.stderr)


def section_prepare(ctx: Context) -> dict:
    from harness.site import unavailable

    reason = unavailable() or next((f"{t} is not installed" for t in TOOLS
                                    if shutil.which(t) is None), None)
    if reason is None and not os.path.exists("/dev/fuse"):
        reason = "/dev/fuse is missing"
    if reason:
        print(f"  SKIPPED: {reason}")
        return {"skipped": reason}
    n = rounds()
    print(f"{n} x prepare from the backup host (TCP, TLS, a token, a new connection each) of a "
          "directory on ext4 on the primary, attached on the application host (nbdfuse + loop),")
    print("a writer writing files (write + fsync) all along; pair.resync between prepares (not "
          "timed); data on tmpfs")
    out: dict = {"window_p99_target_ms": WINDOW_P99_TARGET_MS,
                 "e2e_p99_target_ms": PREPARE_P99_TARGET_MS}
    for label, size in SIZES:
        r = one_size(ctx, label, size, n)
        ctx.cleanup()       # one site at a time
        out[label.replace(" ", "")] = r
        ok_w, ok_e = r["targets"]["window_p99"], r["targets"]["e2e_p99"]
        print(f"  {label:6s} freeze window p50 {r['window_p50_ms']:6.1f} ms  p99 "
              f"{r['window_p99_ms']:6.1f} ms  max {r['window_max_ms']:6.1f} ms   (target p99 < "
              f"{WINDOW_P99_TARGET_MS:g} ms)  {verdict(ok_w)}")
        print(f"  {'':6s} prepare e2e   p50 {r['e2e_p50_ms']:6.1f} ms  p99 {r['e2e_p99_ms']:6.1f} "
              f"ms  max {r['e2e_max_ms']:6.1f} ms   (target p99 < {PREPARE_P99_TARGET_MS:g} ms)  "
              f"{verdict(ok_e)}")
        print(f"  {'':6s} {r['rounds']} prepares in {r['wall_s']} s; agent's own prepare p50 "
              f"{r['agent_p50_ms']:.1f} ms; FIFREEZE p50 {r['freeze_p50_ms']:.1f} ms, p99 "
              f"{r['freeze_p99_ms']:.1f} ms (RCU grace periods expedited in {r['expedited']} of "
              f"{r['rounds']}), the rest of the window (split) p50 {r['split_p50_ms']:.1f} ms; "
              "the writer "
              f"completed {r['files_written']} files; `splitctl backup prepare` (a process, "
              f"Python's start-up included) p50 {r['cli_p50_ms']:.0f} ms over {CLI_ROUNDS}")
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["drive"]:
        sys.exit(drive(sys.argv[2:]))
    sys.exit("usage: prepare.py drive ... (run by bench/run.py --only prepare)")
else:
    SECTION = Section("prepare", "coordinated split across three hosts: freeze window and "
                      "prepare end to end over TLS", section_prepare)
