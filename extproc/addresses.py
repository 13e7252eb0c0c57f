"""Addresses as extproc's options give them: where to listen, where the upstreams are."""

from __future__ import annotations

import re
from dataclasses import dataclass

from extproc.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    """A listening socket this process was handed open (``--listen fd://N``, systemd's
    LISTEN_FDS) rather than one it binds."""

    fd: int

    def __str__(self) -> str:
        return f"fd://{self.fd}"


def parse_address(value: str, option: str, default_host: str = "0.0.0.0") -> Address:
    """``host:port``, ``:port`` (all interfaces) or ``[v6]:port``."""
    match = re.fullmatch(r"(\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d{1,5})", value)
    if not match or not 0 <= int(match["port"]) <= 65535:
        raise ConfigError(option, f"expected HOST:PORT, :PORT or [V6]:PORT, got {value!r}")
    return Address(match["v6"] or match["host"] or default_host, int(match["port"]))


def parse_listen(value: str, option: str) -> Address | InheritedSocket:
    """:func:`parse_address`'s forms, or ``fd://N``: serve on inherited descriptor N."""
    if value.startswith("fd://"):
        fd = value[len("fd://") :]
        if not fd.isdigit():
            raise ConfigError(option, f"expected fd://N with N a descriptor number, got {value!r}")
        return InheritedSocket(int(fd))
    return parse_address(value, option)
