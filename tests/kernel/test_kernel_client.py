"""The Linux kernel's NBD client (`nbd-client` + /dev/nbdX) against splitd.

Each Debian cloud kernel (6.1, and 6.12 whose driver also sends WRITE_ZEROES)
boots under QEMU with /init from init.sh, reaches the daemon on the host's
loopback as 10.0.2.2 (user-mode networking, no default route) and:

- attaches a 64 GiB sparse volume with the netlink path (-C 2, -b 512) and
  then the ioctl path (-L, -C 2, -b 4096);
- writes and reads from 512 B to the device's maximum request (O_DIRECT,
  O_DIRECT|O_DSYNC for FUA, buffered), checks that a maximum request goes out
  as one, runs many processes at once (more requests in flight than the
  daemon's per-connection cap, which is lowered for this), discards 6 GiB and
  3 sectors, and zeroes with `blkdiscard -z`;
- makes ext4 on a paired volume, thousands of small files and a few large
  ones, fstrim, `e2fsck -n -f`, remount, checksums;
- splits the pair while a writer makes files: attaches the secondary, whose
  journal replays, and finds every file durable before the split intact;
- the host then reads both exports with nbdcopy and the written raw regions
  with libnbd, and checks them against the guest's checksums.

It fails on any FAIL from the guest, any NBD/block/ext4 error in the guest's
kernel log, and any WARNING/ERROR/traceback in the daemon's log. Select it
with `-m kernel`, leave it out with `-m "not kernel"`.
"""
from __future__ import annotations

import hashlib
import io
import random
import re
import shutil
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from tests.kernel import guest
from tests.pairs.helpers import wait_mirrored

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

KERNELS = [
    pytest.param("linux-image-cloud-amd64", id="6.1"),
    pytest.param("linux-image-6.12-cloud-amd64", id="6.12"),
]
# The daemon's --max-inflight for this test: the guest must see more requests
# in flight than CAP x CONNECTIONS (the kernel queues past the server's cap).
# Sampled every 5 ms in the guest, the 6.12 driver's peak was 11-12 in three
# runs and 8 in one: with CAP = 4 (threshold 8) the check failed now and then
# on a busy machine; with 2 (threshold 4) it keeps its meaning and its margin.
CAP = 2
CONNECTIONS = 2        # nbd-client -C
PARALLEL = 32          # guest processes doing I/O at once
RAW_SIZE = "64G"
FS_SIZE = "256M"
BIG_MB = 24            # each of the large files
SMALL_FILES = 3000
GUEST_TIMEOUT = 900    # seconds for one guest, boot to power-off (TCG, busy cores)
STALL = 240            # seconds without a line on the console: the guest hangs

INIT = Path(__file__).with_name("init.sh")

# In the guest's console (kernel messages are printed there too).
KERNEL_BAD = re.compile(
    r"Other side returned error|I/O error|blk_update_request|Buffer I/O error|"
    r"EXT4-fs error|nbd\d+: (Receive control failed|Send control failed|Dead connection|"
    r"Unexpected reply|Double reply|Connection timed out)|Call Trace|BUG:|WARNING:")
DAEMON_BAD = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")


@pytest.fixture(scope="module")
def qemu():
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed: scripts/install-deps installs "
                    "qemu-system-x86 when run as root (make deps)")
    for tool in ("nbdcopy", "apt-get", "dpkg-deb", "ldd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def small_tar(seed: int = 8) -> bytes:
    """SMALL_FILES files of 0..8 KiB of random bytes in 30 directories."""
    rnd = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(SMALL_FILES):
            data = rnd.randbytes(rnd.randrange(0, 8192))
            info = tarfile.TarInfo(f"d{i % 30:02d}/f{i:05d}")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Run:
    """What one guest reported, parsed from its console."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        self.fails = [ln.split("@@FAIL ", 1)[1] for ln in lines if "@@FAIL " in ln]
        self.kernel = [ln for ln in lines if KERNEL_BAD.search(ln)]
        self.info: dict[tuple[str, str], str] = {}
        self.sums: list[tuple[str, int, int, str]] = []
        self.devsums: dict[str, str] = {}
        self.steps: list[tuple[str, float]] = []
        self.done: int | None = None
        for ln in lines:
            m = re.search(r"@@(\S+) ?(.*)$", ln)
            if not m:
                continue
            tag, rest = m.groups()
            f = rest.split()
            if tag == "INFO" and len(f) >= 2:
                self.info[(f[0], f[1])] = " ".join(f[2:])
            elif tag == "SUM" and len(f) == 4:
                self.sums.append((f[0], int(f[1]), int(f[2]), f[3]))
            elif tag == "DEVSUM" and len(f) == 2:
                self.devsums[f[0]] = f[1]
            elif tag == "STEP" and len(f) == 2:
                self.steps.append((f[0], float(f[1])))
            elif tag == "DONE" and f:
                self.done = int(f[0])

    def get(self, where: str, key: str) -> str:
        return self.info.get((where, key), "")

    def timings(self) -> str:
        """Each step's duration in the guest (the last one's is unknown)."""
        pairs = zip(self.steps, self.steps[1:], strict=False)
        out = [f"{name} {nxt - t:.0f}s" for (name, t), (_, nxt) in pairs]
        return ", ".join(out + [name for name, _ in self.steps[-1:]])


def run_guest(d, k: guest.Kernel, tmp: Path, params: dict[str, str]) -> tuple[Run, guest.Guest]:
    initrd = guest.build_initramfs(
        k, INIT.read_text(),
        {"/etc/params": "".join(f"{key}={val}\n" for key, val in params.items()).encode(),
         "/etc/mke2fs.conf": Path("/etc/mke2fs.conf").read_bytes(),
         "/data/small.tar": small_tar()},
        tmp / "initrd.gz")
    g = guest.boot(k, initrd, tmp / "console.log")
    split_done = finished = False
    deadline = time.monotonic() + GUEST_TIMEOUT
    last_line = time.monotonic()
    try:
        while True:
            lines = g.poll_lines()
            now = time.monotonic()
            if lines:
                last_line = now
            for line in lines:
                if "@@SPLIT-NOW" in line and not split_done:
                    d.call("pair.split", name=params["SEC"])
                    split_done = True
                finished = finished or "@@DONE" in line
            if finished or not g.alive():
                break
            if now > deadline or now - last_line > STALL:
                why = (f"did not finish in {GUEST_TIMEOUT} s" if now > deadline
                       else f"printed nothing for {STALL} s")
                raise AssertionError(
                    f"{k.package}: the guest {why} ({g.accel}); "
                    f"console tail:\n{g.tail()}\n--- splitd log tail:\n{log_tail(d)}")
            time.sleep(0.2)
        # let it power off (and the console flush) before reading the rest
        if g.proc is not None:
            try:
                g.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        g.poll_lines()
    finally:
        g.kill()
    return Run(g.lines + [g._partial]), g


class TrafficSampler:
    """Bytes each TCP connection to the daemon has moved (received + sent and
    acknowledged, from `ss -ti`), sampled twice a second: the peer's address
    (as the daemon logs it) -> the most seen."""

    def __init__(self, port: int, into: dict[str, int]):
        self.port, self.seen = port, into
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        cp = subprocess.run(["ss", "-Htin", "state", "established", "sport", "=",
                             f":{self.port}"], capture_output=True, text=True, timeout=10)
        for entry in re.split(r"\n(?=\S)", cp.stdout):
            f = entry.split()
            if len(f) < 4:
                continue
            moved = sum(int(n) for n in re.findall(r"bytes_(?:received|acked):(\d+)", entry))
            peer = f[3]
            self.seen[peer] = max(self.seen.get(peer, 0), moved)

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self._sample()
            except (OSError, subprocess.SubprocessError):
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(15)


def log_tail(d, n: int = 40) -> str:
    return "\n".join(d.log().splitlines()[-n:])


def export_sha(uri: str) -> str:
    h = hashlib.sha256()
    with subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE,
                          stdin=subprocess.DEVNULL) as p:
        while chunk := p.stdout.read(1 << 20):
            h.update(chunk)
    assert p.returncode == 0, f"nbdcopy {uri} - exited {p.returncode}"
    return h.hexdigest()


@pytest.mark.parametrize("meta", KERNELS)
def test_kernel_nbd_client(meta, qemu, make_daemon, tmp_path):
    started = time.monotonic()
    k = guest.kernel(meta)
    d = make_daemon(["--max-inflight", str(CAP)])
    d.create_volume("raw", RAW_SIZE)
    d.create_volume("fs", FS_SIZE)
    d.call("pair.create", primary="fs", secondary="fs-snap", create_secondary=True)
    wait_mirrored(d, "fs-snap")
    params = {"PORT": str(d.tcp_port), "RAW": "raw", "FS": "fs", "SEC": "fs-snap",
              "PAR": str(PARALLEL), "BIG_MB": str(BIG_MB)}
    prepared = time.monotonic()
    traffic: dict[str, int] = {}
    with TrafficSampler(d.tcp_port, traffic):
        run, g = run_guest(d, k, tmp_path, params)
    ran = time.monotonic()

    def context() -> str:
        return (f"\n--- {k.package} under {g.accel}; steps: {run.timings()}"
                f"\n--- guest console (tail):\n{g.tail(80)}"
                f"\n--- splitd log (tail):\n{log_tail(d)}")

    assert run.done is not None, f"the guest stopped before the end{context()}"
    assert not run.fails, "the guest's checks failed:\n  " + "\n  ".join(run.fails) + context()
    assert run.done == 0, f"the guest counted {run.done} failures{context()}"
    assert not run.kernel, ("errors in the guest's kernel log:\n  " + "\n  ".join(run.kernel)
                            + context())

    # What the guest saw of the device and the load it made.
    assert run.get("raw", "hw_queues") == str(CONNECTIONS), context()
    assert int(run.get("raw", "size")) == 64 << 30, context()
    assert run.get("raw-ioctl", "logical_block_size") == "4096", context()
    maxreq = run.get("raw", "max_request").split()
    assert maxreq[1:] == ["write_ios", "1", "read_ios", "1"], \
        f"a maximum request ({maxreq[0]} bytes) did not go out as one: {maxreq}{context()}"
    assert int(maxreq[0]) >= 1 << 20, context()
    # Every connection carried I/O (-C 2 spreads requests over both).
    opened = re.findall(r"client (127\.0\.0\.1:\d+) on \S+ opened export (\S+)", d.log())
    per_export: dict[str, int] = {}
    for _peer, export in opened:
        per_export[export] = per_export.get(export, 0) + 1
    assert per_export.get("raw") == 2 * CONNECTIONS and per_export.get("fs") == CONNECTIONS, \
        f"connections opened per export: {per_export}{context()}"
    idle = [f"{export} from {peer}: {traffic.get(peer, 0)} bytes"
            for peer, export in opened if traffic.get(peer, 0) < 1 << 20]
    assert not idle, f"connections that carried (almost) nothing: {idle}{context()}"
    inflight = int(run.get("raw", "max_inflight") or 0)
    assert inflight > CAP * CONNECTIONS, \
        f"only {inflight} requests were in flight at most (cap {CAP} x {CONNECTIONS}){context()}"
    if k.release.startswith("6.12"):
        assert int(run.get("raw", "write_zeroes_max_bytes") or 0) > 0, \
            f"the 6.12 driver should send WRITE_ZEROES{context()}"
    assert run.get("split", "journal_replayed") == "1", \
        f"the secondary's journal did not replay (was the split taken mid-write?){context()}"
    assert "trimmed" in run.get("fs", "fstrim"), context()

    # The host's view: the raw regions the guest wrote, through libnbd.
    import nbd
    h = nbd.NBD()
    h.connect_uri(d.uri("raw"))
    try:
        bad = []
        for _export, off, length, want in run.sums:
            got = hashlib.sha256(h.pread(length, off)).hexdigest()
            if got != want:
                bad.append(f"{off}+{length}")
        assert not bad, f"raw regions read back differently on the host: {bad[:10]}{context()}"
        assert len(run.sums) > 50, context()
    finally:
        h.shutdown()
    # Both ext4 exports, whole, with nbdcopy.
    for export in ("fs", "fs-snap"):
        assert export in run.devsums, f"no checksum of {export} from the guest{context()}"
        assert export_sha(d.uri(export)) == run.devsums[export], \
            f"{export}: the host reads other bytes than the guest did{context()}"

    d.stop()
    bad = [ln for ln in d.log().splitlines() if DAEMON_BAD.search(ln)]
    assert not bad, "the daemon logged warnings or errors:\n  " + "\n  ".join(bad[:20]) + context()
    print(f"\n{k.package} ({g.accel}): prepare {prepared - started:.0f}s, guest "
          f"{ran - prepared:.0f}s, checks {time.monotonic() - ran:.0f}s; {run.timings()}; "
          f"MiB per connection: {[traffic.get(peer, 0) >> 20 for peer, _ in opened]}")
