"""A writer that keeps writing files, as an application would while its
filesystem is backed up:

    python -m harness.writer DIR LOG [--keep N] [--max-size BYTES]

File after file in DIR: random bytes written, fsync'ed, closed; then one JSON
line in LOG (outside DIR): {"name", "sha256", "size", "started", "done"},
`done` the wall clock (time.time(), what the host agent reports `frozen_at`
in) once the fsync returned. A file whose `done` is before a freeze began is
complete in the image split under that freeze.

--keep N: write the names f000000 .. f(N-1) over and over (a bounded amount of
space, for benchmarks; a file rewritten across a freeze is then in the image
in one of its versions, or torn). Without it every name is new.
SIGTERM or SIGINT: finish the file being written, record it, exit 0. A full
filesystem (ENOSPC) also ends the run, with status 0 and a note on stderr.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import signal
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.writer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("log")
    ap.add_argument("--keep", type=int, default=0, metavar="N")
    ap.add_argument("--max-size", type=int, default=64 * 1024, metavar="BYTES")
    args = ap.parse_args(argv)
    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    os.makedirs(args.dir, exist_ok=True)
    i = 0
    with open(args.log, "a", buffering=1) as log:
        while not stop:
            name = f"f{(i % args.keep) if args.keep else i:06d}"
            data = random.randbytes(random.randint(1, args.max_size))
            started = time.time()
            try:
                fd = os.open(os.path.join(args.dir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                             0o644)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    print(f"writer: {args.dir} is full after {i} files", file=sys.stderr)
                    return 0
                raise
            log.write(json.dumps({"name": name, "sha256": hashlib.sha256(data).hexdigest(),
                                  "size": len(data), "started": started,
                                  "done": time.time()}) + "\n")
            i += 1
    return 0


def records(log_path: str) -> list[dict]:
    """The writer's log, one dict per completed file (a torn last line is skipped)."""
    out = []
    with open(log_path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


if __name__ == "__main__":
    sys.exit(main())
