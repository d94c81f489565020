"""A small Linux guest for testing splitd against the kernel's NBD client.

This machine's kernel has no `nbd` module, so the test boots Debian's own
kernels under QEMU (TCG when KVM cannot run them) with a tiny initramfs:

- kernels: `linux-image-*-cloud-amd64` packages, fetched with `apt-get
  download` and unpacked with `dpkg-deb -x` into a cache directory (never
  installed on the host); `nbd.ko`, virtio-net and what they depend on are
  taken from them (dependencies read from each module's .modinfo; `.ko.xz`
  decompressed, for busybox's insmod);
- userland: busybox-static (the shell), Debian's `nbd-client` with its
  libraries, and `mke2fs`, `e2fsck`, `blkdiscard`, `fstrim`, `dd` copied from
  the host with the libraries `ldd` names;
- network: QEMU user mode. The guest reaches the host's loopback as 10.0.2.2
  and has no default route, so nothing else is reachable.

Downloads and unpacked packages live under
``${XDG_CACHE_HOME:-~/.cache}/splitd-tests/kernel`` (outside the checkout), so
a rerun only builds the initramfs (a few seconds). Delete that directory to
pick up newer kernels.
"""
from __future__ import annotations

import gzip
import io
import lzma
import os
import platform
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Guest packages: fetched, never installed on the host.
USERLAND_PACKAGES = ["busybox-static", "nbd-client", "libnl-3-200", "libnl-genl-3-200"]
# Host tools copied into the guest (with their libraries). Called by full path
# in the guest: busybox's shell prefers its own applets.
HOST_TOOLS = ["/sbin/mke2fs", "/sbin/e2fsck", "/sbin/blkdiscard", "/sbin/fstrim", "/bin/dd"]
# Modules the guest loads, in this order (with their dependencies first).
# Built-in ones (virtio_pci in 6.12) are skipped.
GUEST_MODULES = ["virtio_pci", "virtio_net", "nbd"]

BOOT_MARKER = "@@BOOT"


class GuestError(Exception):
    pass


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "splitd-tests" / "kernel"


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 600) -> str:
    cp = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                        stdin=subprocess.DEVNULL)
    if cp.returncode != 0:
        raise GuestError(f"{' '.join(cmd)} exited {cp.returncode}: {cp.stderr.strip()}")
    return cp.stdout


_apt_updated = False


def _apt(cmd: list[str], cwd: Path | None = None) -> str:
    """An apt command; on failure run `apt-get update` once (lists may be stale
    or absent on a fresh machine) and try again."""
    global _apt_updated
    try:
        return _run(cmd, cwd)
    except GuestError:
        if _apt_updated or os.geteuid() != 0:
            raise
        _apt_updated = True
        _run(["apt-get", "update", "-qq"])
        return _run(cmd, cwd)


def resolve_package(meta: str) -> str:
    """The concrete package a meta-package (linux-image-cloud-amd64) depends on."""
    out = _apt(["apt-cache", "depends", meta])
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    raise GuestError(f"apt-cache depends {meta}: no linux-image dependency in\n{out}")


def unpacked(package: str) -> Path:
    """`apt-get download` one package into the cache and unpack it; cached."""
    root = cache_dir() / "pkg" / package
    if (root / ".done").exists():
        return root
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = [p for p in debs.glob(f"{package}_*.deb")]
    if not found:
        _apt(["apt-get", "download", "-q", package], cwd=debs)
        found = [p for p in debs.glob(f"{package}_*.deb")]
        if not found:
            raise GuestError(f"apt-get download {package} left no .deb in {debs}")
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(found[0]), str(tmp)])
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    (root / ".done").touch()
    return root


@dataclass
class Kernel:
    package: str
    root: Path

    @property
    def release(self) -> str:
        return self.package.removeprefix("linux-image-")

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def moddir(self) -> Path:
        return self.root / "lib" / "modules" / self.release


def kernel(meta: str) -> Kernel:
    """The kernel a meta-package names, unpacked in the cache.

    The concrete package a meta-package resolves to is remembered, so reruns
    ask apt nothing; delete the cache directory to move to a newer kernel."""
    note = cache_dir() / f"meta-{meta}"
    package = note.read_text().strip() if note.exists() else None
    if not package or not (cache_dir() / "pkg" / package / ".done").exists():
        package = resolve_package(meta)
    root = unpacked(package)
    note.parent.mkdir(parents=True, exist_ok=True)
    note.write_text(package + "\n")
    k = Kernel(package, root)
    if not k.vmlinuz.exists():
        raise GuestError(f"{package} has no {k.vmlinuz.name}")
    return k


# -- modules ------------------------------------------------------------------

def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        data = lzma.decompress(data)
    return data


def _modname(path: Path) -> str:
    return path.name.split(".ko")[0].replace("-", "_")


def _depends(data: bytes) -> list[str]:
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    if not m or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",") if d]


def modules_for(k: Kernel, names: list[str]) -> list[tuple[str, bytes]]:
    """(name, uncompressed .ko) for the named modules and their dependencies,
    dependencies first; built-in modules are left out."""
    index = {_modname(p): p for p in (k.moddir / "kernel").rglob("*.ko*")}
    builtin = set()
    bpath = k.moddir / "modules.builtin"
    if bpath.exists():
        builtin = {_modname(Path(line.strip())) for line in bpath.read_text().splitlines()
                   if line.strip()}
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in index:
            if name in builtin:
                return
            raise GuestError(f"module {name} is neither in {k.package} nor built in")
        data = _module_bytes(index[name])
        for dep in _depends(data):
            visit(dep)
        order.append((name, data))

    for n in names:
        visit(n)
    return order


# -- initramfs ------------------------------------------------------------------

class Cpio:
    """A cpio archive in the newc format, as the kernel unpacks an initramfs."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        name = name.lstrip("/")
        if name in self.names:
            return
        self.names.add(name)
        nameb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nameb), 0))
        self.ino += 1
        self.buf.write(hdr.encode() + nameb)
        self.buf.write(b"\0" * (-(110 + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.dir(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.dir(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _libraries(binary: Path, extra_dirs: list[Path]) -> list[Path]:
    """The shared libraries `ldd` resolves for a binary (with the guest
    packages' library directories searched first)."""
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(str(d) for d in extra_dirs))
    cp = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env,
                        timeout=60)
    if cp.returncode != 0:
        raise GuestError(f"ldd {binary}: {cp.stderr.strip() or cp.stdout.strip()}")
    libs = []
    for line in cp.stdout.splitlines():
        m = re.search(r"=>\s*(\S+)\s+\(", line) or re.match(r"\s*(/\S+)\s+\(", line)
        if m:
            libs.append(Path(m.group(1)))
        elif "not found" in line:
            raise GuestError(f"ldd {binary}: {line.strip()}")
    return libs


def build_initramfs(k: Kernel, init_script: str, files: dict[str, bytes],
                    out: Path) -> Path:
    """Write a gzip'd newc initramfs for kernel k: busybox, nbd-client, the
    host tools, the modules (under /modules, in load order in /modules/order),
    the /init script and any extra files."""
    pkgs = {p: unpacked(p) for p in USERLAND_PACKAGES}
    arc = Cpio()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "lib", "lib64", "etc", "proc", "sys",
              "dev", "tmp", "mnt", "run", "modules"):
        arc.dir(d)

    busybox = pkgs["busybox-static"] / "bin" / "busybox"
    arc.file("/bin/busybox", busybox.read_bytes(), 0o755)
    for applet in ("sh", "mount", "umount", "ip", "insmod", "sleep", "cat", "echo",
                   "mkdir", "ls", "poweroff", "sync"):
        arc.symlink(f"/bin/{applet}", "busybox")

    lib_dirs = sorted({p.parent for root in pkgs.values() for p in root.rglob("*.so*")})
    binaries = [(pkgs["nbd-client"] / "sbin" / "nbd-client", "/sbin/nbd-client")]
    binaries += [(Path(t).resolve(), "/host" + t) for t in HOST_TOOLS]
    libs: dict[str, Path] = {}
    for src, dest in binaries:
        if not src.exists():
            raise GuestError(f"{src} is missing (for the guest's {dest})")
        arc.file(dest, src.read_bytes(), 0o755)
        for lib in _libraries(src, lib_dirs):
            libs[lib.name] = lib
    for name, lib in sorted(libs.items()):
        dest = "/lib64/" + name if name.startswith("ld-linux") else "/lib/x86_64-linux-gnu/" + name
        arc.file(dest, lib.resolve().read_bytes(), 0o755)

    mods = modules_for(k, GUEST_MODULES)
    for name, data in mods:
        arc.file(f"/modules/{name}.ko", data)
    arc.file("/modules/order", "".join(f"{n}\n" for n, _ in mods).encode())

    for name, data in files.items():
        arc.file(name, data)
    arc.file("/init", init_script.encode(), 0o755)
    out.write_bytes(gzip.compress(arc.finish(), compresslevel=1))
    return out


# -- QEMU -----------------------------------------------------------------------

def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def _kvm_note() -> Path:
    return cache_dir() / f"kvm-fails-on-{platform.release()}"


@dataclass
class Guest:
    """One QEMU run: the console goes to a file that the test reads as it grows."""
    k: Kernel
    initrd: Path
    console: Path
    memory_mb: int = 1536
    accel: str = "tcg"
    proc: subprocess.Popen | None = None
    started: float = 0.0
    _offset: int = 0
    _partial: str = ""
    lines: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        accel = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else \
            ["-accel", "tcg,thread=single", "-cpu", "max"]
        return ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-machine", "q35",
                *accel, "-smp", "2", "-m", str(self.memory_mb),
                "-display", "none", "-monitor", "none", "-no-reboot",
                "-serial", f"file:{self.console}",
                # User-mode networking: the host's loopback is 10.0.2.2 in the
                # guest, which gets no default route (see /init).
                "-netdev", "user,id=n0,ipv6=off", "-device", "virtio-net-pci,netdev=n0,romfile=",
                "-kernel", str(self.k.vmlinuz), "-initrd", str(self.initrd),
                "-append", "console=ttyS0 loglevel=4 log_buf_len=4M panic=-1 "
                           "oops=panic rdinit=/init"]

    def start(self) -> None:
        self.console.write_text("")
        self._offset, self._partial, self.lines = 0, "", []
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._qemu_out: list[bytes] = []
        threading.Thread(target=lambda: self._qemu_out.append(self.proc.stdout.read()),
                         daemon=True).start()

    def qemu_output(self) -> str:
        return b"".join(self._qemu_out).decode(errors="replace")

    def poll_lines(self) -> list[str]:
        """Console lines that arrived since the last call."""
        with open(self.console, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        text = self._partial + data.decode(errors="replace").replace("\r", "")
        *new, self._partial = text.split("\n")
        self.lines += new
        return new

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

    def tail(self, n: int = 60) -> str:
        return "\n".join((self.lines + [self._partial])[-n:])


def boot(k: Kernel, initrd: Path, console: Path, kvm_wait: float = 60.0) -> Guest:
    """Start the guest; under KVM if it reaches /init within kvm_wait seconds
    (a stock kernel may not boot under this machine's KVM), else under TCG."""
    if kvm_usable() and not _kvm_note().exists():
        g = Guest(k, initrd, console, accel="kvm")
        g.start()
        deadline = time.monotonic() + kvm_wait
        while time.monotonic() < deadline and g.alive():
            if any(BOOT_MARKER in line for line in g.poll_lines()):
                return g
            time.sleep(0.2)
        g.kill()
        # Remembered for this host kernel: later runs go straight to TCG.
        _kvm_note().parent.mkdir(parents=True, exist_ok=True)
        _kvm_note().write_text(f"{k.package} did not reach /init under KVM within {kvm_wait} s; "
                               f"QEMU said: {g.qemu_output().strip()[-500:]}\n")
    g = Guest(k, initrd, console, accel="tcg")
    g.start()
    return g
