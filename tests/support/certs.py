"""Certificates made for one test with the openssl command: a CA and what it signs."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_OPENSSL_TIMEOUT = 60


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path

    def pem(self) -> tuple[bytes, bytes]:
        """(private key, certificate chain) as gRPC's credential functions take them."""
        return self.key.read_bytes(), self.cert.read_bytes()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=_OPENSSL_TIMEOUT)


class CertAuthority:
    """A throwaway CA in ``directory`` (EC P-256 keys: quick to make)."""

    def __init__(self, directory: Path, name: str = "extproc test CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.cert = directory / "ca.pem"
        self.key = directory / "ca.key"
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", f"/CN={name}",
            "-keyout", str(self.key), "-out", str(self.cert),
        )  # fmt: skip

    def issue(
        self,
        name: str,
        *,
        dns: tuple[str, ...] = ("localhost",),
        loopback: bool = True,
        client: bool = False,
    ) -> Issued:
        """A certificate for ``name``: a server's for the ``dns`` names (and 127.0.0.1 when
        ``loopback``), or a client's."""
        key, csr, cert = (self.directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
        extensions = self.directory / f"{name}.ext"
        usage = "clientAuth" if client else "serverAuth"
        san = ",".join([*(f"DNS:{d}" for d in dns), *(["IP:127.0.0.1"] if loopback else [])])
        extensions.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr),
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-CAcreateserial", "-days", "1", "-extfile", str(extensions), "-out", str(cert),
        )  # fmt: skip
        return Issued(cert, key)
