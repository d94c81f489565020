"""Volumes of a splitd daemon attached as local block devices, and the
records that say which device is which volume of which daemon.

    att = attach(Attachments(state_dir), "db", "tcp://storage:10810",
                 token_file="host.token", tls_ca="ca.pem", port="app", mount="/srv/db")
    detach(Attachments(state_dir), "/srv/db")

Two ways to a block device:
- the kernel's NBD client, `nbd-client`, where /dev/nbd* exists (the nbd
  module is loaded) and nbd-client is installed. NOT TESTED: the machine this
  was written on has no nbd module;
- otherwise `nbdfuse` shows the export as a file (FUSEDIR/nbd, FUSEDIR in
  the state directory) and `losetup --find --show` makes that file
  /dev/loopN. nbdfuse runs in its own session so it outlives this command.
  TLS to the export (nbds://) is libnbd's, with the system's CAs; a private
  CA is given as --tls-certificates DIR (libnbd's layout), and nbdfuse then
  runs nbdkit's nbd plugin, which takes it (nbdfuse_args). nbd-client is
  given DIR/ca-cert.pem, or --tls-ca, as -cacertfile.

One record per device, STATE_DIR/attachments/DEVICE.json (written
atomically): {device, devno, volume, daemon, token_file, tls_ca, nbd_uri,
method, tls_certificates, fuse_dir, nbdfuse_pid, mountpoint, read_only, attached_at}.
prepare() finds a filesystem's volume through them (by device number).
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from agents.host.daemon import ConfigError, admin_client
from agents.host.mounts import device_number, mounted_at
from agents.host.state import read_json, remove_durably, write_json
from agents.tools import ToolFailed, nbdfuse_source, run_tool, start_nbdfuse
from splitctl.client import AdminError

__all__ = ["Attachment", "Attachments", "AttachError", "attach", "detach", "is_nbdfuse", "status"]

NBDFUSE_START_TIMEOUT = 15.0
CMD_TIMEOUT = 60.0


class AttachError(Exception):
    """code: "bad-input", "not-found", "ambiguous", "busy", "daemon" (the
    daemon refused or could not be reached), "failed" (a tool failed)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Attachment:
    device: str
    devno: list[int]
    volume: str
    daemon: str
    nbd_uri: str
    method: str                     # "nbdfuse+loop" or "nbd-client"
    tls_certificates: str | None = None     # libnbd's layout: DIR/ca-cert.pem, ...
    token_file: str | None = None
    tls_ca: str | None = None
    fuse_dir: str | None = None
    nbdfuse_pid: int | None = None
    mountpoint: str | None = None
    read_only: bool = False
    attached_at: float = field(default_factory=time.time)

    @classmethod
    def from_dict(cls, data: dict) -> Attachment:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        at = f" at {self.mountpoint}" if self.mountpoint else ""
        return f"{self.device} (volume {self.volume} of {self.daemon}{at})"

    def admin_client(self, timeout: float = 60.0):
        return admin_client(self.daemon, self.token_file, self.tls_ca, timeout)


class Attachments:
    """The records in STATE_DIR/attachments."""

    def __init__(self, state_dir: str | os.PathLike):
        self.state_dir = Path(state_dir)
        self.folder = self.state_dir / "attachments"

    def _path(self, device: str) -> Path:
        return self.folder / f"{os.path.basename(device)}.json"

    def list(self) -> list[Attachment]:
        out = []
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            data = read_json(path)
            if isinstance(data, dict):
                with contextlib.suppress(TypeError):
                    out.append(Attachment.from_dict(data))
        return out

    def save(self, att: Attachment) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_json(self._path(att.device), att.as_dict())

    def remove(self, att: Attachment) -> None:
        remove_durably(self._path(att.device))

    def by_devno(self, devno: tuple[int, int]) -> Attachment | None:
        return next((a for a in self.list() if tuple(a.devno) == tuple(devno)), None)

    def find(self, target: str) -> Attachment:
        """By device path, volume name, or a directory on the attached
        filesystem (its mount point or anything under it)."""
        records = self.list()
        if target.startswith("/dev/") or os.path.basename(target).startswith(("loop", "nbd")):
            real = os.path.realpath(target)
            hit = [a for a in records if os.path.realpath(a.device) == real]
            if hit:
                return hit[0]
        by_volume = [a for a in records if a.volume == target]
        if len(by_volume) == 1:
            return by_volume[0]
        if len(by_volume) > 1:
            raise AttachError("ambiguous", f"volume {target} is attached {len(by_volume)} times ("
                              + ", ".join(a.device for a in by_volume) + "): name the device")
        if os.path.isdir(target):
            devno = device_number(os.stat(target).st_dev)
            hit = [a for a in records if tuple(a.devno) == devno]
            if hit:
                return hit[0]
        raise AttachError("not-found", f"{target} is no attached device, volume or mounted "
                          f"directory; attached: {summary(records)}")


def summary(records: list[Attachment]) -> str:
    return ", ".join(a.describe() for a in records) or "nothing"


def _run(args: list[str], what: str) -> str:
    try:
        return run_tool(args, what, CMD_TIMEOUT)
    except ToolFailed as e:
        raise AttachError("failed", str(e)) from None


# -- attach ------------------------------------------------------------------------------

def resolve_uri(volume: str, daemon: str, port: str, token_file: str | None,
                tls_ca: str | None) -> str:
    """The NBD URI of `volume` itself through the daemon's port `port`:
    locate(role="primary"). A daemon without role= answers for the pair's
    secondary; the export name in that URI is then replaced by the volume's."""
    try:
        with admin_client(daemon, token_file, tls_ca, timeout=30) as admin:
            try:
                return admin.call("locate", name=volume, port=port, role="primary")["uri"]
            except AdminError as e:
                if e.code != "bad-input" or "role" not in e.message:
                    raise
            found = admin.call("locate", name=volume, port=port)
    except ConfigError as e:
        raise AttachError("bad-input", str(e)) from None
    except AdminError as e:
        raise AttachError("daemon", f"cannot locate volume {volume} at {daemon}: "
                                    f"{e.message}") from None
    # scheme://[authority]/EXPORT[?query]: urlunsplit would drop the empty
    # authority of nbd+unix:///EXPORT, so the export is replaced by hand.
    scheme, _, rest = found["uri"].partition("://")
    authority, _, tail = rest.partition("/")
    _, question, query = tail.partition("?")
    return f"{scheme}://{authority}/{quote(volume, safe='')}{question}{query}"


def _kernel_nbd_available() -> bool:
    return bool(glob.glob("/dev/nbd[0-9]*")) and shutil.which("nbd-client") is not None


def attach(attachments: Attachments, volume: str, daemon: str, *, nbd_uri: str | None = None,
           port: str | None = None, token_file: str | None = None, tls_ca: str | None = None,
           mount: str | None = None, read_only: bool = False,
           tls_certificates: str | None = None) -> Attachment:
    if (nbd_uri is None) == (port is None):
        raise AttachError("bad-input", "give one of --nbd URI and --port NAME")
    if tls_certificates is not None:
        tls_certificates = _check_cert_dir(tls_certificates)
    if mount is not None and not os.path.isdir(mount):
        raise AttachError("bad-input", f"cannot mount on {mount}: not a directory")
    if token_file or tls_ca or daemon.startswith("tcp://"):
        try:
            admin_client(daemon, token_file, tls_ca).close()     # check them before anything
        except ConfigError as e:
            raise AttachError("bad-input", str(e)) from None
    for a in attachments.list():
        if mount is not None and a.mountpoint and os.path.realpath(a.mountpoint) == \
                os.path.realpath(mount):
            raise AttachError("busy", f"{mount} already holds {a.describe()}")
    uri = nbd_uri if nbd_uri is not None else resolve_uri(volume, daemon, str(port),
                                                          token_file, tls_ca)
    undo: list = []
    try:
        kernel = _kernel_nbd_available()
        if not kernel and uri.startswith("nbds") and tls_certificates is None:
            # libnbd (1.14) given no certificates directory falls back to the
            # system's CAs and then does not verify the server's certificate
            # at all: encrypted, but to whoever answers. Refused.
            raise AttachError("bad-input", f"{uri} needs TLS, and nbdfuse checks the server's "
                                           "certificate only against a CA it is given: add "
                                           "--tls-certificates DIR (DIR/ca-cert.pem), or attach "
                                           "through a plaintext port (?tls=off)")
        if kernel:
            ca = os.path.join(tls_certificates, "ca-cert.pem") if tls_certificates else tls_ca
            att = _attach_kernel(volume, daemon, uri, read_only, ca, undo)
        else:
            att = _attach_fuse(attachments.state_dir, volume, daemon, uri, read_only, undo,
                               tls_certificates)
        att.token_file = os.path.abspath(token_file) if token_file else None
        att.tls_ca = os.path.abspath(tls_ca) if tls_ca else None
        attachments.save(att)
        undo.append(lambda: attachments.remove(att))
        if mount is not None:
            _run(["mount", *(["-o", "ro"] if read_only else []), att.device, mount],
                 f"cannot mount {att.device} on {mount}")
            att.mountpoint = os.path.realpath(mount)
            attachments.save(att)
        return att
    except BaseException:
        for step in reversed(undo):
            with contextlib.suppress(Exception):
                step()
        raise


def nbdfuse_args(uri: str, fuse_dir: str | os.PathLike, pidfile: str | os.PathLike, *,
                 read_only: bool = False, tls_certificates: str | None = None) -> list[str]:
    """The nbdfuse command showing `uri` as FUSE_DIR/nbd (a private CA: see
    agents.tools.nbdfuse_source)."""
    return ["nbdfuse", *(["-r"] if read_only else []), "-P", str(pidfile), str(fuse_dir),
            *nbdfuse_source(uri, tls_certificates, read_only=read_only)]


def _check_cert_dir(path: str) -> str:
    """`path` made absolute, refused at once unless it holds ca-cert.pem."""
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "ca-cert.pem")):
        raise AttachError("bad-input", f"--tls-certificates {path} has no ca-cert.pem: give "
                                       "a directory in libnbd's layout (ca-cert.pem, and "
                                       "client-cert.pem, client-key.pem for client certificates)")
    return path


def _attach_fuse(state_dir: Path, volume: str, daemon: str, uri: str, read_only: bool,
                 undo: list, tls_certificates: str | None = None) -> Attachment:
    name = f"{volume}-{uuid.uuid4().hex[:8]}"
    fuse_dir = state_dir / "fuse" / name
    fuse_dir.mkdir(mode=0o700, parents=True)
    undo.append(lambda: fuse_dir.rmdir())
    pidfile = fuse_dir.with_suffix(".pid")
    log_path = fuse_dir.with_suffix(".log")
    undo.append(lambda: log_path.unlink(missing_ok=True))
    undo.append(lambda: pidfile.unlink(missing_ok=True))
    try:
        # nbdfuse runs in its own session so it outlives this command.
        proc = start_nbdfuse(str(fuse_dir), nbdfuse_source(uri, tls_certificates, read_only=read_only),
                             uri, read_only=read_only, pidfile=str(pidfile),
                             log_path=str(log_path), timeout=NBDFUSE_START_TIMEOUT,
                             start_new_session=True)
    except ToolFailed as e:
        msg = str(e)
        if "not installed" in msg:
            msg = (("nbdkit is" if tls_certificates else "nbdfuse is")
                   + " not installed (and there is no /dev/nbd* for nbd-client)")
        raise AttachError("failed", msg) from None
    undo.append(lambda: _stop_nbdfuse(str(fuse_dir), proc.pid))
    device = _run(["losetup", "--find", "--show", *(["--read-only"] if read_only else []),
                   str(fuse_dir / "nbd")], f"losetup of {fuse_dir / 'nbd'} failed")
    undo.append(lambda: _run(["losetup", "-d", device], "losetup -d"))
    return Attachment(device=device, devno=list(device_number(os.stat(device).st_rdev)),
                      volume=volume, daemon=daemon, nbd_uri=uri, method="nbdfuse+loop",
                      fuse_dir=str(fuse_dir), nbdfuse_pid=proc.pid, read_only=read_only,
                      tls_certificates=tls_certificates)


def _free_nbd_device() -> str:
    for dev in sorted(glob.glob("/dev/nbd[0-9]*"), key=lambda d: int(d[len("/dev/nbd"):])):
        # A connected device has /sys/block/nbdN/pid (the nbd-client's).
        if not os.path.exists(f"/sys/block/{os.path.basename(dev)}/pid"):
            return dev
    raise AttachError("busy", "every /dev/nbd* device is in use")


def _attach_kernel(volume: str, daemon: str, uri: str, read_only: bool, tls_ca: str | None,
                   undo: list) -> Attachment:
    """nbd-client (nbd-client(8): `HOST PORT DEVICE -name EXPORT`, `-unix PATH
    DEVICE -name EXPORT`; TLS with -cacertfile). NOT TESTED: no nbd module
    where this was written."""
    device = _free_nbd_device()
    parts = urlsplit(uri)
    export = parts.path.lstrip("/")
    if parts.scheme == "nbd+unix":
        query = dict(q.split("=", 1) for q in parts.query.split("&") if "=" in q)
        args = ["nbd-client", "-unix", unquote(query.get("socket", "")), device]
    elif parts.scheme in ("nbd", "nbds"):
        args = ["nbd-client", parts.hostname or "", str(parts.port or 10809), device]
        if parts.scheme == "nbds":
            if not tls_ca:
                raise AttachError("bad-input", f"{uri} needs TLS: give --tls-ca (nbd-client's "
                                               "-cacertfile)")
            args += ["-cacertfile", tls_ca, "-tlshostname", parts.hostname or ""]
    else:
        raise AttachError("bad-input", f"nbd-client cannot reach {uri}")
    args += ["-name", unquote(export)] + (["-readonly"] if read_only else [])
    _run(args, f"nbd-client {device} failed")
    undo.append(lambda: _run(["nbd-client", "-d", device], "nbd-client -d"))
    return Attachment(device=device, devno=list(device_number(os.stat(device).st_rdev)),
                      volume=volume, daemon=daemon, nbd_uri=uri, method="nbd-client",
                      read_only=read_only)


# -- detach ------------------------------------------------------------------------------

def _stop_nbdfuse(fuse_dir: str, pid: int | None) -> None:
    subprocess.run(["fusermount3", "-u", fuse_dir], capture_output=True, timeout=CMD_TIMEOUT)
    if pid is None:
        return
    deadline = time.monotonic() + 10
    while is_nbdfuse(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)     # ours when attach fails: reap it
        time.sleep(0.05)
    if is_nbdfuse(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def is_nbdfuse(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return "(nbdfuse)" in stat and stat.rpartition(")")[2].split()[0] != "Z"


def detach(attachments: Attachments, target: str) -> Attachment:
    att = attachments.find(target)
    devno = (att.devno[0], att.devno[1])
    points = mounted_at(devno)
    others = [p for p in points if p != att.mountpoint]
    if others:
        raise AttachError("busy", f"{att.device} is mounted at {', '.join(others)}, which "
                                  "attach did not mount: umount it first")
    for point in reversed(points):
        cp = subprocess.run(["umount", point], capture_output=True, text=True, timeout=CMD_TIMEOUT)
        if cp.returncode != 0:
            why = " ".join(cp.stderr.split())
            if "busy" in why:
                raise AttachError("busy", f"{point} is busy: a process has files open there "
                                          f"(see fuser -vm {point}); nothing was detached")
            raise AttachError("failed", f"cannot umount {point}: {why}")
    if att.method == "nbd-client":
        _run(["nbd-client", "-d", att.device], f"nbd-client -d {att.device} failed")
    else:
        if os.path.exists(f"/sys/block/{os.path.basename(att.device)}/loop"):
            _run(["losetup", "-d", att.device], f"losetup -d {att.device} failed")
        if att.fuse_dir:
            _stop_nbdfuse(att.fuse_dir, att.nbdfuse_pid)
            for leftover in (att.fuse_dir + ".pid", att.fuse_dir + ".log"):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
            with contextlib.suppress(OSError):
                os.rmdir(att.fuse_dir)
    attachments.remove(att)
    return att


def status(att: Attachment) -> dict:
    """The record and what is still true of it: device present (for a loop,
    backed by our FUSE file), nbdfuse running, mounted where recorded."""
    name = os.path.basename(att.device)
    device_ok = os.path.exists(f"/sys/block/{name}")
    if device_ok and att.method == "nbdfuse+loop":
        try:
            backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
        except OSError:
            backing = ""
        device_ok = bool(att.fuse_dir) and backing == os.path.join(att.fuse_dir or "", "nbd")
    elif device_ok and att.method == "nbd-client":
        device_ok = os.path.exists(f"/sys/block/{name}/pid")
    fuse_ok = att.method != "nbdfuse+loop" or is_nbdfuse(att.nbdfuse_pid)
    mounted = bool(att.mountpoint) and att.mountpoint in mounted_at((att.devno[0], att.devno[1]))
    alive = device_ok and fuse_ok and (mounted or not att.mountpoint)
    return dict(att.as_dict(), alive=alive, device_ok=device_ok, nbdfuse_ok=fuse_ok,
                mounted=mounted)
