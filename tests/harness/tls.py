"""Certificates for the TLS tests, made by openssl: a CA, a server certificate for
127.0.0.1, client certificates signed by that CA, and one by a CA nobody trusts."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(args: list[str], cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


class PKI:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        for ca in ("ca", "stranger-ca"):
            _openssl(["req", "-x509", *_EC, "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                      "-days", "30", "-subj", f"/CN={ca}"], workdir)
        self.issue("server", "/CN=exporter", "subjectAltName=IP:127.0.0.1\n"
                   "extendedKeyUsage=serverAuth\n")
        self.issue("prometheus", "/CN=prometheus", "subjectAltName=DNS:prometheus\n"
                   "extendedKeyUsage=clientAuth\n")
        self.issue("alertmanager", "/CN=alertmanager", "subjectAltName=DNS:alertmanager\n"
                   "extendedKeyUsage=clientAuth\n")
        self.issue("stranger", "/CN=stranger", "subjectAltName=DNS:prometheus\n"
                   "extendedKeyUsage=clientAuth\n", ca="stranger-ca")

    def issue(self, name: str, subject: str, ext: str, ca: str = "ca") -> None:
        """`name`.crt/.key signed by `ca` (again: a new key and serial each time)."""
        _openssl(["req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                  "-subj", subject], self.dir)
        (self.dir / f"{name}.ext").write_text(ext)
        _openssl(["x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey",
                  f"{ca}.key", "-CAcreateserial", "-out", f"{name}.crt", "-days", "30",
                  "-extfile", f"{name}.ext"], self.dir)

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def client(self, name: str | None) -> ssl.SSLContext:
        """A client context trusting the CA, presenting `name`'s certificate (if any)."""
        context = ssl.create_default_context(cafile=self.path("ca.crt"))
        if name is not None:
            context.load_cert_chain(self.path(f"{name}.crt"), self.path(f"{name}.key"))
        return context
