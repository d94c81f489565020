"""File-level restore: the files of a backed-up directory as they were in a
snapshot, listed or copied out, from the snapshot served read-only by the
daemon (`backup.serve`, controller/served.py).

    with_snapshot_fs(uri, subdir, request) -> reply

runs this module as a child in a private mount namespace (`unshare -m
--propagation private`): there nbdfuse shows the export as a file, `mount -o
ro,loop` (plus `noload` for ext3/ext4, `norecovery` for XFS: a crash-
consistent image must not be replayed, and cannot be, read-only) mounts it,
and the files are walked (`list`) or copied with `cp -a --sparse=auto
--parents` (`copy`: modes, owners, times, symlinks, hard links among the
files copied, extended attributes, holes).

Cleanup is guaranteed however the child ends: its mounts exist only in its
namespace, which goes when its last process does; nbdfuse gets SIGTERM when
the child dies (PR_SET_PDEATHSIG), and the loop device is made with
autoclear by `mount -o loop`, so it is detached once the filesystem is gone.
On a normal end the child unmounts, stops nbdfuse and removes its temporary
directory itself.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import posixpath
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from agents.tools import ToolFailed, nbdfuse_source, run_tool, start_nbdfuse
from common.errors import BadInput, SplitdError

NBDFUSE_START_TIMEOUT = 30.0
CMD_TIMEOUT = 120.0
_PR_SET_PDEATHSIG = 1
# Mount options that read a possibly unclean filesystem without replaying its
# journal (ext4(5) "noload"; xfs(5) "norecovery").
NO_REPLAY = {"ext3": "noload", "ext4": "noload", "xfs": "norecovery"}


class FilesError(SplitdError):
    """Listing or copying failed (the message says at which step)."""


def directory_in_image(manifest: dict[str, Any]) -> str:
    """The backed-up directory's path inside the image's filesystem ('.' for
    its root): `directory` relative to `mountpoint`, both in the manifest."""
    directory, mountpoint = manifest.get("directory"), manifest.get("mountpoint")
    if not directory or not mountpoint:
        return "."
    rel = posixpath.relpath(directory, mountpoint)
    return "." if rel.startswith("..") else rel


def clean_path(path: str) -> str:
    """A PATH the user gave, relative to the backed-up directory; BadInput if
    it leaves it."""
    rel = posixpath.normpath(path.lstrip("/") or ".")
    if rel == ".." or rel.startswith("../"):
        raise BadInput(f"path {path!r} leaves the backed-up directory")
    return rel


# -- the parent side ---------------------------------------------------------------------


def with_snapshot_fs(uri: str, subdir: str, request: dict[str, Any],
                     tls_ca: str | None = None) -> dict[str, Any]:
    """Run `request` ({"op": "list", "path"} or {"op": "copy", "paths", "to"})
    on the filesystem of the export at `uri`, `subdir` being the backed-up
    directory inside it, in a child in a private mount namespace. An nbds://
    URI is checked against `tls_ca` (else the system's CAs)."""
    # The temporary directory is the parent's: removed even if the child is killed.
    tmp = tempfile.mkdtemp(prefix=f"splitd-files-{os.getpid()}-")
    certs = None
    if tls_ca and uri.startswith("nbds"):
        # libnbd's tls-certificates DIR: it looks for DIR/ca-cert.pem.
        certs = os.path.join(tmp, "certs")
        os.mkdir(certs, 0o700)
        shutil.copyfile(tls_ca, os.path.join(certs, "ca-cert.pem"))
    body = json.dumps(dict(request, uri=uri, subdir=subdir, tmp=tmp, certs=certs)).encode()
    cmd = ["unshare", "-m", "--propagation", "private", sys.executable, "-m", "agents.backup.files"]
    try:
        cp = subprocess.run(cmd, input=body, capture_output=True, timeout=24 * 3600)
    except FileNotFoundError:
        raise FilesError("unshare is not installed (util-linux)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        reply: dict[str, Any] = json.loads(cp.stdout)
    except ValueError:
        err = " ".join(cp.stderr.decode(errors="replace").split())[-400:]
        raise FilesError(f"file access failed (exit {cp.returncode}): {err or 'no message'}") from None
    if "error" in reply:
        failure = FilesError(reply["error"])
        failure.code = reply.get("code", failure.code)      # bad-input stays bad-input
        raise failure
    return reply


# -- the child side (in its own mount namespace) ----------------------------------------


def _run(args: list[str], what: str) -> str:
    try:
        return run_tool(args, what, CMD_TIMEOUT)
    except ToolFailed as e:
        raise FilesError(str(e)) from None


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@contextlib.contextmanager
def mounted(uri: str, tmp: str, certs: str | None = None) -> Iterator[str]:
    """The export's filesystem mounted read-only under directory `tmp`
    (empty); yields its mount point. `certs`: libnbd's tls-certificates
    directory for an nbds:// URI."""
    fuse_dir, mnt = os.path.join(tmp, "fuse"), os.path.join(tmp, "mnt")
    os.mkdir(fuse_dir, 0o700)
    os.mkdir(mnt, 0o700)
    pidfile, log_path = os.path.join(tmp, "nbdfuse.pid"), os.path.join(tmp, "nbdfuse.log")
    proc: subprocess.Popen[bytes] | None = None
    is_mounted = False
    try:
        try:
            proc = start_nbdfuse(fuse_dir, nbdfuse_source(uri, certs, read_only=True), uri,
                                 read_only=True, pidfile=pidfile, log_path=log_path,
                                 timeout=NBDFUSE_START_TIMEOUT, preexec_fn=_die_with_parent)
        except ToolFailed as e:
            raise FilesError(str(e)) from None
        image = os.path.join(fuse_dir, "nbd")
        fstype = _run(["blkid", "-p", "-o", "value", "-s", "TYPE", image],
                      f"no filesystem found on {uri} (blkid)")
        options = ",".join(["ro", "loop", *([NO_REPLAY[fstype]] if fstype in NO_REPLAY else [])])
        _run(["mount", "-t", fstype, "-o", options, image, mnt], f"mount of {fstype} from {uri} failed")
        is_mounted = True
        yield mnt
    finally:
        if is_mounted:
            subprocess.run(["umount", mnt], capture_output=True, timeout=CMD_TIMEOUT)
        if proc is not None:
            subprocess.run(["fusermount3", "-u", fuse_dir], capture_output=True, timeout=CMD_TIMEOUT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(10)


def _inside(root: str, rel: str) -> str:
    """root/rel, refused if a symlink among its parents leads out of root (the
    image's own links must never reach the host's files)."""
    full = os.path.join(root, rel)
    parent = os.path.realpath(os.path.dirname(full))
    if parent != root and not parent.startswith(root + "/"):
        raise BadInput(f"path {rel!r} goes through a symbolic link out of the backed-up directory")
    return full


def _entry(path: str, rel: str) -> dict[str, Any]:
    st = os.lstat(path)
    kind = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
            stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
            stat.S_IFSOCK: "socket"}.get(stat.S_IFMT(st.st_mode), "other")
    out: dict[str, Any] = {"path": rel, "type": kind, "mode": f"{stat.S_IMODE(st.st_mode):04o}",
                           "uid": st.st_uid, "gid": st.st_gid, "size": st.st_size,
                           "allocated": st.st_blocks * 512, "nlink": st.st_nlink,
                           "mtime": st.st_mtime}
    if kind == "symlink":
        out["target"] = os.readlink(path)
    return out


def list_files(root: str, rel: str) -> list[dict[str, Any]]:
    top = _inside(root, rel)
    if not os.path.lexists(top):
        raise FilesError(f"{rel!r}: no such file or directory in the snapshot")
    out = [_entry(top, rel)]
    if os.path.isdir(top) and not os.path.islink(top):
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                out.append(_entry(full, os.path.normpath(os.path.join(rel, os.path.relpath(full, top)))))
    return out


def copy_files(root: str, rels: list[str], to: str) -> dict[str, Any]:
    for rel in rels:
        if not os.path.lexists(_inside(root, rel)):
            raise FilesError(f"{rel!r}: no such file or directory in the snapshot")
    os.makedirs(to, exist_ok=True)
    # One cp for every path: hard links among them stay links. --parents
    # keeps each path's place under the backed-up directory.
    cp = subprocess.run(["cp", "-a", "--sparse=auto", "--parents", "--", *rels, os.path.abspath(to)],
                        cwd=root, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if cp.returncode != 0:
        raise FilesError(f"copy failed: {' '.join(cp.stderr.split())[-400:]}")
    return {"copied": rels, "to": os.path.abspath(to)}


def _child(request: dict[str, Any]) -> dict[str, Any]:
    with mounted(request["uri"], request["tmp"], request.get("certs")) as mnt:
        root = os.path.realpath(os.path.join(mnt, request["subdir"]))
        if not os.path.isdir(root):
            raise FilesError(f"the backed-up directory {request['subdir']!r} is not in the snapshot's "
                             "filesystem")
        if request["op"] == "list":
            return {"files": list_files(root, request["path"])}
        return copy_files(root, request["paths"], request["to"])


def main() -> int:
    try:
        reply = _child(json.load(sys.stdin))
    except SplitdError as e:
        reply = {"error": str(e), "code": str(e.code)}
    except (OSError, subprocess.SubprocessError) as e:
        reply = {"error": str(e)}
    json.dump(reply, sys.stdout)
    return 1 if "error" in reply else 0


if __name__ == "__main__":
    sys.exit(main())
