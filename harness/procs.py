"""Small pieces the launchers and test servers share."""
from __future__ import annotations

import signal
import socket
import subprocess


def stop_process(proc: subprocess.Popen, timeout: float, sig: int | None = signal.SIGTERM) -> int:
    """Send `sig` (None: none, the caller has asked it to go already) to a
    process still running, wait up to `timeout` s, then SIGKILL. Returns the
    exit status (negative: the signal that ended it)."""
    if proc.poll() is None:
        if sig is not None:
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def recv_line(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Bytes up to and including a newline, or what came before EOF (at
    most `limit` bytes: a peer that never ends its line cannot grow us)."""
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf
