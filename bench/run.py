#!/usr/bin/env python3
"""splitd benchmarks: `make bench`, or `.venv/bin/python bench/run.py [options]`.

Sections (run in this order; pick some with --only a,b):
  foundation  splitd vs nbdkit (file plugin) vs qemu-nbd on tmpfs, four fio
              workloads, interleaved, with splitd's CPU time and peak RSS.
              Uses the referee script ../shared/bench/compare.sh when present,
              otherwise an equivalent built in here.
  scale       100 sparse 1 TiB volumes on an idle daemon: RSS after creation
              and after a restart, and how long `splitctl volume list` takes.
  split       pair.split round trip (100 x split + resync) of a 1 TiB pair with
              every region pending, rate 1 B/s: p50/p99/max, target p99 < 1 ms
              on tmpfs; also with the engine held back (information), and on
              /var/tmp, a disk (its own verdict, labelled).
  paired-writes
              fio 4 KiB randwrite qd16 on an unpaired volume, a primary in
              `pair` and a primary split with every region pending (2
              interleaved rounds, median): target pair/unpaired >= 0.7, on
              tmpfs, then on /var/tmp (disk, sync before each run; its own
              verdict, labelled).
  copy-engine the copy engine (pair.create --create-secondary until `pair`,
              and on until the copy is durable: the diff bitmap file all clear)
              vs `cp --sparse=always SRC DST && sync --data DST` of the same
              1 GiB: target (durable vs durable) >= 0.8 on tmpfs, and
              the same on /var/tmp (disk, labelled verdict); copy-on-read 4 KiB
              read latency (fio clat p50/p99) vs unpaired, on tmpfs.
  pair-memory daemon RSS with two 1 TiB volumes, then paired, then split:
              target delta < 16 MiB.
  prepare     the coordinated split across three network namespaces (storage,
              application, backup host) with a writer running: $PREPARE_ROUNDS
              (default 100) prepares from the backup host over TLS of a 1 GiB
              and a 1 TiB volume: the agent's freeze window (FIFREEZE to
              FITHAW) target p99 < 50 ms, prepare end to end p99 < 250 ms.
              Root and /dev/fuse, else skipped.
  backup      splitctl backup vs restic, borg and nbdcopy on a split
              secondary of --backup-size (default 4 GiB; a quarter holes, a
              quarter written zeroes, half /usr/lib content): full backup
              >= 1.5x restic and borg, incremental (1% of regions) reads only
              the delta and takes <= 5% of the full's time, restore >= 1.5x
              restic restore, stored size <= restic's repository.

Options: --rt SECONDS per fio workload (default: $RT, else 6), --json FILE to
also write every figure as JSON, --builtin-referee to use the built-in logic
even when compare.sh exists, --list to show the sections, -v for progress.

Layout: this file is the command line and the driver; bench/benchkit.py is
what the sections share (context and clean-up, splitd and other processes, CPU
watch, fio helpers, tables, the section registry, the JSON report); each
section is a module of bench/sections/. To add a section, see benchkit.py.

Only the standard library and splitd's own packages (harness, splitctl's
client library) are used.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from benchkit import (
    SPLITD,
    BenchError,
    Context,
    environment,
    error_text,
    install_signal_handlers,
    load_sections,
    loadavg,
    write_json,
)

from splitctl.client import AdminError


def main(argv: list[str] | None = None) -> int:
    sections = load_sections()
    ap = argparse.ArgumentParser(description="splitd benchmarks", epilog="sections: " + ", ".join(
        s.name for s in sections))
    ap.add_argument("--only", metavar="A,B", help="run only these sections, in the usual order")
    ap.add_argument("--rt", type=int, default=None,
                    help="seconds per fio workload (default: $RT, else 6)")
    ap.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON")
    ap.add_argument("--builtin-referee", action="store_true",
                    help="use the built-in copy of compare.sh's logic even when the script exists")
    ap.add_argument("--backup-size", metavar="SIZE",
                    help="backup: the secondary's size, a multiple of 64M (default: "
                         "$BACKUP_SIZE, else 4G)")
    ap.add_argument("--backup-dir", metavar="DIR",
                    help="backup: where the stores, repositories, image and restores go "
                         "(default: $BACKUP_DIR, else /var/tmp)")
    ap.add_argument("--backup-rounds", type=int, metavar="N",
                    help="backup: rounds of each variant, interleaved; medians (default: "
                         "$BACKUP_ROUNDS, else 1)")
    ap.add_argument("--list", action="store_true", help="list the sections and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="say what is happening")
    args = ap.parse_args(argv)

    if args.list:
        for s in sections:
            print(f"{s.name:12s} {s.title}")
        return 0
    chosen = sections
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in {s.name for s in sections}]
        if unknown:
            ap.error(f"unknown section(s): {', '.join(unknown)} "
                     f"(known: {', '.join(s.name for s in sections)})")
        chosen = [s for s in sections if s.name in wanted]
    rt = args.rt if args.rt is not None else int(os.environ.get("RT") or 6)
    if rt < 1:
        ap.error("--rt must be at least 1")
    if not SPLITD.exists():
        print(f"{SPLITD} not found: run `make venv` first", file=sys.stderr)
        return 2

    install_signal_handlers()
    env = environment()
    print(f"splitd bench  {env['date']}  commit {env['commit']}"
          f"{' (+local changes)' if env['worktree_modified'] else ''}  {env['splitd']}  "
          f"{env['cpus']} CPUs  kernel {env['kernel']}  load {env['loadavg_at_start']}")
    report = {"environment": env, "rt_s": rt, "sections": {}}
    failed = []
    interrupted = False
    for s in chosen:
        print(f"\n== {s.name}: {s.title}  (load average {loadavg()})")
        ctx = Context(rt, args.verbose, args.builtin_referee,
                      {"backup_size": args.backup_size, "backup_rounds": args.backup_rounds,
                       "backup_dir": args.backup_dir})
        t0 = time.monotonic()
        try:
            report["sections"][s.name] = s.run(ctx)
        except KeyboardInterrupt:
            print(f"\ninterrupted during {s.name}; cleaning up", file=sys.stderr)
            report["sections"][s.name] = {"error": "interrupted"}
            interrupted = True
        except (BenchError, AdminError, OSError, subprocess.SubprocessError) as e:
            print(f"{s.name}: ERROR: {error_text(e)}", file=sys.stderr)
            report["sections"][s.name] = {"error": error_text(e)}
            failed.append(s.name)
        finally:
            ctx.cleanup()
        report["sections"][s.name]["elapsed_s"] = round(time.monotonic() - t0, 1)
        report["sections"][s.name]["loadavg_after"] = loadavg()
        print(f"-- {s.name}: {time.monotonic() - t0:.0f} s; load average now {loadavg()}")
        if interrupted:
            break

    if args.json:
        write_json(args.json, report)
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
