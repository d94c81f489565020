"""Throw-away certificates for TLS tests and benchmarks, made with openssl: a CA,
and server certificates signed by it for the names a test reaches a server by
(localhost and 127.0.0.1 unless told otherwise; addresses in a network namespace
for the netns tests).

    ca = make_ca(d)                                   # d/ca-cert.pem, d/ca-key.pem
    cert, key = make_server_cert(d, names=["10.77.5.1"], name="storage")
    certs = libnbd_cert_dir(d / "libnbd", ca)        # for nbds://...?tls-certificates=DIR
"""
from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
LOCAL_NAMES = ("localhost", "127.0.0.1")


class PKIError(RuntimeError):
    """openssl failed: the message holds its command and stderr."""


def openssl(*args: str, cwd: Path) -> None:
    cp = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if cp.returncode != 0:
        raise PKIError(f"openssl {' '.join(args)} failed:\n{cp.stderr}")


def make_ca(d: Path, name: str = "ca", cn: str | None = None) -> Path:
    """A self-signed CA in `d`: NAME-cert.pem (returned) and NAME-key.pem;
    its subject CN=`cn` (default "splitd test NAME")."""
    openssl("req", "-x509", *KEY, "-keyout", f"{name}-key.pem", "-out", f"{name}-cert.pem",
            "-days", "2", "-subj", f"/CN={cn or f'splitd test {name}'}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    return d / f"{name}-cert.pem"


def _san(names: Sequence[str]) -> str:
    out = []
    for n in names:
        try:
            ipaddress.ip_address(n)
            out.append(f"IP:{n}")
        except ValueError:
            out.append(f"DNS:{n}")
    return ",".join(out)


def make_server_cert(d: Path, ca: str = "ca", names: Sequence[str] = LOCAL_NAMES,
                     name: str = "server") -> tuple[Path, Path]:
    """(certificate, key) for `names` (host names or IP addresses), signed by
    the CA `ca` in `d`: d/NAME-cert.pem and d/NAME-key.pem."""
    return _make_cert(d, ca, name, names[0],
                      f"subjectAltName={_san(names)}\nextendedKeyUsage=serverAuth\n")


def make_client_cert(d: Path, ca: str = "ca", name: str = "client",
                     cn: str = "splitd test client") -> tuple[Path, Path]:
    """(certificate, key) of a TLS client, signed by the CA `ca` in `d`."""
    return _make_cert(d, ca, name, cn, "extendedKeyUsage=clientAuth\n")


def _make_cert(d: Path, ca: str, name: str, cn: str, ext: str) -> tuple[Path, Path]:
    openssl("req", "-new", *KEY, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr",
            "-subj", f"/CN={cn}", cwd=d)
    (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                   + ext)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey",
            f"{ca}-key.pem", "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
            "-out", f"{name}-cert.pem", cwd=d)
    return d / f"{name}-cert.pem", d / f"{name}-key.pem"


def libnbd_cert_dir(d: Path, ca: Path) -> Path:
    """A directory libnbd takes as tls-certificates=DIR for a client that
    checks the server against `ca`: it looks for ca-cert.pem there (and for
    client-cert.pem / client-key.pem, which we do not give)."""
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca, d / "ca-cert.pem")
    return d
