"""Throw-away certificates for TLS tests, made with openssl as test_tls.py
makes them: a CA and a server certificate for localhost / 127.0.0.1."""
from __future__ import annotations

import subprocess
from pathlib import Path

KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def openssl(*args: str, cwd: Path) -> None:
    cp = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, f"openssl {' '.join(args)}:\n{cp.stderr}"


def make_ca(d: Path, name: str = "ca") -> Path:
    openssl("req", "-x509", *KEY, "-keyout", f"{name}-key.pem", "-out", f"{name}-cert.pem",
            "-days", "2", "-subj", f"/CN=splitd test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    return d / f"{name}-cert.pem"


def make_server_cert(d: Path, ca: str = "ca") -> tuple[Path, Path]:
    """(certificate, key) for localhost and 127.0.0.1, signed by `ca`."""
    openssl("req", "-new", *KEY, "-keyout", "server-key.pem", "-out", "server.csr",
            "-subj", "/CN=localhost", cwd=d)
    (d / "server.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                  "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                  "extendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", f"{ca}-cert.pem", "-CAkey", f"{ca}-key.pem",
            "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server-cert.pem",
            cwd=d)
    return d / "server-cert.pem", d / "server-key.pem"


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate and key it signed, and a second CA that
    signed nothing here: {"ca", "cert", "key", "other_ca"}."""
    ca = make_ca(d)
    cert, key = make_server_cert(d)
    return {"ca": ca, "cert": cert, "key": key, "other_ca": make_ca(d, "other-ca")}
