"""The freeze hook: `HOOK freeze MOUNTPOINT` before the freeze (a database
flushes and holds its writes), `HOOK thaw MOUNTPOINT` after the thaw, as
qemu-ga's fsfreeze-hook. It runs in a session of its own so that, past its
timeout, it is killed with everything it started (a `sleep` in a shell
script would otherwise keep the pipe open)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile

from agents.host.state import HookConfig

__all__ = ["HookFailed", "run_hook"]

STDERR_TAIL = 400


class HookFailed(Exception):
    pass


def run_hook(hook: HookConfig, action: str, mountpoint: str) -> None:
    """Run the hook if one is configured; HookFailed (one line, with the tail
    of its stderr) if it fails or outlives hook.timeout."""
    if not hook.path:
        return
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen([hook.path, action, mountpoint], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        except OSError as e:
            raise HookFailed(f"cannot run the {action} hook {hook.path}: "
                             f"{e.strerror or e}") from None
        try:
            rc = proc.wait(hook.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise HookFailed(f"the {action} hook {hook.path} did not finish in "
                             f"{hook.timeout:g} s: killed{_tail(err)}") from None
        if rc != 0:
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited {rc}"
            raise HookFailed(f"the {action} hook {hook.path} {how}{_tail(err)}")


def _tail(f) -> str:
    f.seek(0)
    text = " ".join(f.read().decode(errors="replace").split())
    if len(text) > STDERR_TAIL:
        text = "..." + text[-STDERR_TAIL:]
    return f": {text}" if text else ""
