"""cutdisk: an NBD server whose unflushed writes can be lost, as in a power cut.

    python -m harness.powerloss.cutdisk --image FILE --socket SOCK --control CTL

The export is the file FILE (the *durable* image: what survives a power cut).
Writes go to an *overlay* in memory (4 KiB blocks) until something makes them
durable:

  * READ returns the overlay over the durable image.
  * FLUSH merges the whole overlay into the durable image (proto.md, "Ordering
    of messages and writes": every write completed before the flush is
    durable when it is answered; merging writes not yet answered as well is
    allowed, and with requests handled one at a time there are none).
  * WRITE / TRIM / WRITE_ZEROES with FUA make exactly the bytes of that
    request durable at once; earlier unflushed writes stay in the overlay.
  * TRIM reads back as zeroes, like WRITE_ZEROES (a durable TRIM punches a
    hole in FILE).
  * "hold" (on the control socket) makes every FLUSH wait, unanswered, until
    the cut: a disk whose flushes are slow enough that the power goes first.
    Writes and reads go on meanwhile (on other connections; a connection's
    requests after its held FLUSH wait with it).
  * "cut" (on the control socket) drops the overlay -- or keeps a random part
    of it, as a disk may have written back some of its cache before the power
    went -- and from then on answers every WRITE / TRIM / WRITE_ZEROES with
    success and ignores it, and FLUSH does nothing: whatever the kernel still
    writes back after the cut cannot land. READs come from the durable image.

Stopping the server (SIGTERM, SIGINT) drops the overlay too: only a FLUSH
makes a write survive. Start a new server on FILE for "after the power came
back".

Protocol: fixed newstyle (NO_ZEROES), NBD_OPT_EXPORT_NAME / GO / INFO / LIST /
ABORT; every other option is answered NBD_REP_ERR_UNSUP (structured replies
included: only simple replies). Any export name is the one export.
Transmission flags: HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM,
SEND_WRITE_ZEROES; no CAN_MULTI_CONN (a flush covers every connection anyway:
there is one overlay). One thread per connection; requests are handled one at
a time under one lock, so each is atomic with respect to the others and to a
cut.

The control socket takes one line per connection and answers one line:
    cut [keep=FRACTION] [seed=N]  ->  ok dropped=BLOCKS kept=BLOCKS flushes=N
    hold                          ->  ok (FLUSHes wait until the cut)
    stats                         ->  {"writes": ..., "flushes": ..., ...}  (JSON)

The protocol numbers come from nbdwire, the one place splitd writes them down
(from NetworkBlockDevice/nbd doc/proto.md); that they match what others mean
by them is checked by clients written elsewhere (libnbd, qemu, nbdfuse, the
kernel's client), which this server itself talks to.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness.procs import recv_line, stop_process
from nbdwire.constants import (  # the spec's values, one definition
    CLIENT_FIXED_NEWSTYLE as C_FIXED_NEWSTYLE,
    CLIENT_NO_ZEROES as C_NO_ZEROES,
    CMD_DISC,
    CMD_FLAG_FUA,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    ENOSPC,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_EXPORT,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPTION_REPLY_MAGIC as REPLY_MAGIC,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_SERVER,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    TF_HAS_FLAGS,
    TF_SEND_FLUSH,
    TF_SEND_FUA,
    TF_SEND_TRIM,
    TF_SEND_WRITE_ZEROES,
)

REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")

BLOCK = 4096
MAX_PAYLOAD = 32 << 20
MAX_OPTION = 64 << 10
ZERO_BLOCK = bytes(BLOCK)
TF = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, offset: int, length: int) -> None:
    if length <= 0:
        return
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        if e not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(e, os.strerror(e))
        os.pwrite(fd, bytes(length), offset)


class Disk:
    """The durable image plus the overlay of writes not yet made durable.

    overlay: block number -> the block's whole current content (bytes), for
    every block with an unflushed change. Callers hold `lock`."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.overlay: dict[int, bytes] = {}
        self.cut = False
        self.lock = threading.Lock()
        self.released = threading.Event()   # cleared by "hold", set by the cut
        self.released.set()
        self.stats = {"writes": 0, "fua": 0, "flushes": 0, "trims": 0, "zeroes": 0,
                      "reads": 0, "ignored": 0, "merged_blocks": 0, "connections": 0}

    # -- the view ---------------------------------------------------------------------

    def _durable(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        return data + bytes(length - len(data))

    def read(self, offset: int, length: int) -> bytes:
        self.stats["reads"] += 1
        data = self._durable(offset, length)
        if not self.overlay or self.cut:
            return data
        out = None
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        for b in range(first, last + 1):
            blk = self.overlay.get(b)
            if blk is None:
                continue
            if out is None:
                out = bytearray(data)
            lo = max(offset, b * BLOCK)
            hi = min(offset + length, (b + 1) * BLOCK)
            out[lo - offset:hi - offset] = blk[lo - b * BLOCK:hi - b * BLOCK]
        return data if out is None else bytes(out)

    def _block(self, b: int) -> bytes:
        blk = self.overlay.get(b)
        return blk if blk is not None else self._durable(b * BLOCK, BLOCK)

    def _overlay_write(self, offset: int, length: int, data: bytes | None) -> None:
        """The overlay's view of [offset, offset+length) becomes data (None:
        zeroes)."""
        end = offset + length
        for b in range(offset // BLOCK, (end - 1) // BLOCK + 1):
            lo, hi = max(offset, b * BLOCK), min(end, (b + 1) * BLOCK)
            if lo == b * BLOCK and hi == (b + 1) * BLOCK:
                self.overlay[b] = ZERO_BLOCK if data is None else data[lo - offset:hi - offset]
                continue
            blk = bytearray(self._block(b))
            piece = bytes(hi - lo) if data is None else data[lo - offset:hi - offset]
            blk[lo - b * BLOCK:hi - b * BLOCK] = piece
            self.overlay[b] = bytes(blk)

    def _overlay_patch(self, offset: int, length: int, data: bytes | None) -> None:
        """After a FUA request made [offset, offset+length) durable: blocks of
        the overlay it covers whole are now the durable content (dropped);
        blocks it covers in part take its bytes (their other bytes stay
        unflushed)."""
        end = offset + length
        for b in range(offset // BLOCK, (end - 1) // BLOCK + 1):
            blk = self.overlay.get(b)
            if blk is None:
                continue
            lo, hi = max(offset, b * BLOCK), min(end, (b + 1) * BLOCK)
            if lo == b * BLOCK and hi == (b + 1) * BLOCK:
                del self.overlay[b]
                continue
            nb = bytearray(blk)
            nb[lo - b * BLOCK:hi - b * BLOCK] = (bytes(hi - lo) if data is None
                                                  else data[lo - offset:hi - offset])
            self.overlay[b] = bytes(nb)

    def _durable_zero(self, offset: int, length: int) -> None:
        end = offset + length
        start_b = -(-offset // BLOCK) * BLOCK       # first whole block
        end_b = end // BLOCK * BLOCK
        if start_b >= end_b:
            os.pwrite(self.fd, bytes(length), offset)
            return
        if offset < start_b:
            os.pwrite(self.fd, bytes(start_b - offset), offset)
        punch_hole(self.fd, start_b, end_b - start_b)
        if end_b < end:
            os.pwrite(self.fd, bytes(end - end_b), end_b)

    # -- commands -------------------------------------------------------------------------

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        self.stats["writes"] += 1
        if self.cut:
            self.stats["ignored"] += 1
            return
        if fua:
            self.stats["fua"] += 1
            os.pwrite(self.fd, data, offset)
            self._overlay_patch(offset, len(data), data)
        else:
            self._overlay_write(offset, len(data), data)

    def zero(self, offset: int, length: int, fua: bool, trim: bool) -> None:
        self.stats["trims" if trim else "zeroes"] += 1
        if self.cut:
            self.stats["ignored"] += 1
            return
        if fua:
            self.stats["fua"] += 1
            self._durable_zero(offset, length)
            self._overlay_patch(offset, length, None)
        else:
            self._overlay_write(offset, length, None)

    def flush(self) -> None:
        self.stats["flushes"] += 1
        if self.cut:
            self.stats["ignored"] += 1
            return
        self._merge(sorted(self.overlay))
        self.overlay.clear()

    def _merge(self, blocks: list[int]) -> None:
        """Write these overlay blocks to the durable image (runs coalesced;
        zero blocks punched)."""
        self.stats["merged_blocks"] += len(blocks)
        i = 0
        while i < len(blocks):
            j = i
            zero = self.overlay[blocks[i]] is ZERO_BLOCK
            while (j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1
                   and (self.overlay[blocks[j + 1]] is ZERO_BLOCK) == zero
                   and j - i < 2048):
                j += 1
            if zero:
                punch_hole(self.fd, blocks[i] * BLOCK, (j - i + 1) * BLOCK)
            else:
                start = blocks[i] * BLOCK
                data = b"".join(self.overlay[b] for b in blocks[i:j + 1])
                # (A last block short of BLOCK is kept whole in the overlay;
                # the image does not grow.)
                os.pwrite(self.fd, data[:self.size - start], start)
            i = j + 1

    def power_cut(self, keep: float = 0.0, seed: int | None = None) -> tuple[int, int]:
        """Drop the overlay (keeping a random `keep` part of its blocks) and
        ignore every later change. Returns (blocks dropped, blocks kept)."""
        rng = random.Random(seed)
        blocks = sorted(self.overlay)
        kept = [b for b in blocks if keep > 0 and rng.random() < keep]
        self._merge(kept)
        self.overlay.clear()
        self.cut = True
        self.released.set()
        return len(blocks) - len(kept), len(kept)


# -- NBD connections ---------------------------------------------------------------------------


class Gone(Exception):
    pass


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise Gone
        buf += chunk
    return bytes(buf)


def option_reply(sock, option: int, rtype: int, data: bytes = b"") -> None:
    sock.sendall(OPTION_REPLY.pack(REPLY_MAGIC, option, rtype, len(data)) + data)


def handshake(sock: socket.socket, disk: Disk) -> bool:
    """Fixed newstyle negotiation; True once in transmission."""
    sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    (cflags,) = struct.unpack(">I", recv_exact(sock, 4))
    if not cflags & C_FIXED_NEWSTYLE or cflags & ~(C_FIXED_NEWSTYLE | C_NO_ZEROES):
        return False
    no_zeroes = bool(cflags & C_NO_ZEROES)
    while True:
        magic, option, length = OPTION.unpack(recv_exact(sock, OPTION.size))
        if magic != IHAVEOPT or length > MAX_OPTION:
            return False
        data = recv_exact(sock, length) if length else b""
        if option == OPT_EXPORT_NAME:
            sock.sendall(struct.pack(">QH", disk.size, TF) + (b"" if no_zeroes else bytes(124)))
            return True
        if option == OPT_ABORT:
            option_reply(sock, option, REP_ACK)
            return False
        if option == OPT_LIST:
            if data:
                option_reply(sock, option, REP_ERR_INVALID)
            else:
                option_reply(sock, option, REP_SERVER, struct.pack(">I", 0))
                option_reply(sock, option, REP_ACK)
            continue
        if option in (OPT_INFO, OPT_GO):
            if len(data) < 6:
                option_reply(sock, option, REP_ERR_INVALID)
                continue
            (nlen,) = struct.unpack_from(">I", data)
            if 4 + nlen + 2 > len(data):
                option_reply(sock, option, REP_ERR_INVALID)
                continue
            (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
            if 4 + nlen + 2 + 2 * nreq != len(data):
                option_reply(sock, option, REP_ERR_INVALID)
                continue
            option_reply(sock, option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, disk.size, TF))
            option_reply(sock, option, REP_ACK)
            if option == OPT_GO:
                return True
            continue
        option_reply(sock, option, REP_ERR_UNSUP)


def serve(sock: socket.socket, disk: Disk) -> None:
    with disk.lock:
        disk.stats["connections"] += 1
    try:
        if not handshake(sock, disk):
            return
        while True:
            magic, flags, cmd, cookie, offset, length = REQUEST.unpack(
                recv_exact(sock, REQUEST.size))
            if magic != REQUEST_MAGIC:
                return
            payload = b""
            if cmd == CMD_WRITE:
                if length > MAX_PAYLOAD:
                    return          # cannot take it, cannot skip it safely
                payload = recv_exact(sock, length)
            if cmd == CMD_DISC:
                return
            fua = bool(flags & CMD_FLAG_FUA)
            error, data = 0, b""
            if cmd in (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES) and \
                    offset + length > disk.size:
                error = EINVAL if cmd == CMD_READ else ENOSPC
            elif cmd == CMD_READ and length > MAX_PAYLOAD:
                error = EINVAL
            else:
                if cmd == CMD_FLUSH:
                    disk.released.wait()    # "hold": until the cut
                with disk.lock:
                    if cmd == CMD_READ:
                        data = disk.read(offset, length) if length else b""
                    elif cmd == CMD_WRITE:
                        if length:
                            disk.write(offset, payload, fua)
                    elif cmd == CMD_FLUSH:
                        disk.flush()
                    elif cmd in (CMD_TRIM, CMD_WRITE_ZEROES):
                        if length:
                            disk.zero(offset, length, fua, trim=cmd == CMD_TRIM)
                    else:
                        error = EINVAL
            reply = SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)
            sock.sendall(reply + data if not error else reply)
    except (Gone, ConnectionError):
        return
    except OSError as e:
        print(f"cutdisk: connection: {e}", file=sys.stderr, flush=True)
    finally:
        sock.close()


def control(conn: socket.socket, disk: Disk) -> None:
    try:
        line = recv_line(conn)
        words = line.decode().split()
        if words and words[0] == "cut":
            args = dict(w.split("=", 1) for w in words[1:])
            keep = float(args.get("keep", 0))
            seed = int(args["seed"]) if "seed" in args else None
            with disk.lock:
                dropped, kept = disk.power_cut(keep, seed)
                flushes = disk.stats["flushes"]
            answer = f"ok dropped={dropped} kept={kept} flushes={flushes}"
            print(f"cutdisk: cut: {dropped} unflushed blocks dropped, {kept} kept",
                  file=sys.stderr, flush=True)
        elif words == ["hold"]:
            disk.released.clear()
            answer = "ok"
        elif words and words[0] == "stats":
            with disk.lock:
                answer = json.dumps(dict(disk.stats, overlay_blocks=len(disk.overlay),
                                         cut=disk.cut))
        else:
            answer = f"error: unknown command {line.decode(errors='replace').strip()!r}"
        conn.sendall(answer.encode() + b"\n")
    except (OSError, ValueError, KeyError) as e:
        try:
            conn.sendall(f"error: {e}\n".encode())
        except OSError:
            pass
    finally:
        conn.close()


def listen_unix(path: str) -> socket.socket:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(16)
    return s


def accept_loop(lsock: socket.socket, handler, disk: Disk) -> None:
    while True:
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        threading.Thread(target=handler, args=(conn, disk), daemon=True).start()


class CutDisk:
    """A cutdisk server in its own process, for tests: start(), uri, cut(),
    stats(), stop(). Its log goes to DIR/cutdisk.log."""

    def __init__(self, image, directory):
        self.image = Path(image)
        self.dir = Path(directory)
        self.socket = self.dir / "cutdisk.sock"
        self.control_socket = self.dir / "cutdisk.ctl"
        self.log_path = self.dir / "cutdisk.log"
        self.proc = None
        self.flushes_at_cut: int | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def start(self, timeout: float = 15.0) -> CutDisk:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        for p in (self.socket, self.control_socket):
            if p.exists():
                p.unlink()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "harness.powerloss.cutdisk", "--image", str(self.image),
                 "--socket", str(self.socket), "--control", str(self.control_socket)],
                cwd=root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cutdisk exited with {self.proc.returncode}: "
                                   f"{self.log()}")
            try:
                self.stats()
                if self.socket.exists():
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"cutdisk did not come up: {self.log()}")
            time.sleep(0.02)

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(self.control_socket))
            s.sendall(line.encode() + b"\n")
            answer = recv_line(s).decode().strip()
        if not answer or answer.startswith("error"):
            raise RuntimeError(f"cutdisk {line!r}: {answer or 'no answer'}")
        return answer

    def stats(self) -> dict:
        return json.loads(self.command("stats"))

    def hold(self) -> None:
        """From now until the cut, FLUSH requests wait unanswered."""
        self.command("hold")

    def cut(self, keep: float = 0.0, seed: int | None = None) -> tuple[int, int]:
        """The power cut; returns (unflushed blocks dropped, kept).
        self.flushes_at_cut: FLUSH requests handled before it."""
        line = f"cut keep={keep}" + (f" seed={seed}" if seed is not None else "")
        words = dict(w.split("=") for w in self.command(line).split()[1:])
        self.flushes_at_cut = int(words["flushes"])
        return int(words["dropped"]), int(words["kept"])

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, 15)
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", required=True, help="the durable image (a file; its size is "
                    "the export's)")
    ap.add_argument("--socket", required=True, help="NBD Unix socket to listen on")
    ap.add_argument("--control", required=True, help="control Unix socket (cut, stats)")
    args = ap.parse_args(argv)
    disk = Disk(args.image)
    nbd_sock = listen_unix(args.socket)
    ctl_sock = listen_unix(args.control)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=accept_loop, args=(nbd_sock, serve, disk), daemon=True).start()
    threading.Thread(target=accept_loop, args=(ctl_sock, control, disk), daemon=True).start()
    print(f"cutdisk: serving {args.image} ({disk.size} bytes) on {args.socket}",
          file=sys.stderr, flush=True)
    while not stop.wait(1.0):
        pass
    # The overlay is dropped: only FLUSH and FUA make writes survive. The
    # lock is never released: no request is handled after this point.
    disk.lock.acquire()
    for p in (args.socket, args.control):
        try:
            os.unlink(p)
        except OSError:
            pass
    print(f"cutdisk: stopped; stats {json.dumps(disk.stats)}, "
          f"{len(disk.overlay)} unflushed blocks dropped", file=sys.stderr, flush=True)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
