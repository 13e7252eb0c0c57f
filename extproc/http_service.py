"""Envoy's ``http_service`` transport, as configured: where the HTTP processor is and how each
event is POSTed to it (:class:`HttpTransport`), from the filter's ``ExtProcHttpService``.

Envoy POSTs each ``ProcessingRequest`` in proto3 JSON to ``http_uri.uri`` on the cluster
``http_uri.cluster``, within ``http_uri.timeout``; extproc resolves the cluster through
``--cluster`` / ``clusters:`` as it does ``envoy_grpc``, or connects to the URI's own host and
port when no cluster entry names it.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2

from extproc.addresses import parse_address
from extproc.channels import ChannelFlags
from extproc.errors import ConfigError

WHERE = "ext_proc.http_service.http_service"
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class HttpTransport:
    """One HTTP processor: each event is a POST of ``path`` to ``host``:``port``."""

    host: str
    port: int
    path: bytes  # the POST's request target: http_uri.uri's path and query
    authority: bytes  # its Host header: http_uri.uri's host (and port), as Envoy sends it
    timeout: float  # http_uri.timeout: the deadline of each POST
    headers: tuple[tuple[bytes, bytes], ...] = ()  # request_headers_to_add
    tls: ssl.SSLContext | None = None  # https: verified with --processor-ca, else the system's
    server_hostname: str | None = None


def http_transport(
    service: ext_proc_pb2.ExtProcHttpService,
    clusters: Mapping[str, str],
    channel: ChannelFlags,
) -> HttpTransport:
    http = service.http_service
    uri = http.http_uri
    if not uri.uri:
        raise ConfigError(f"{WHERE}.http_uri.uri", "is required")
    parts = urlsplit(uri.uri)
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ConfigError(
            f"{WHERE}.http_uri.uri",
            f"expected http://HOST[:PORT]/PATH or https://..., got {uri.uri!r}",
        )
    if not uri.HasField("timeout"):
        raise ConfigError(f"{WHERE}.http_uri.timeout", "is required (as in Envoy)")
    timeout = uri.timeout.ToTimedelta().total_seconds()
    if timeout <= 0:
        raise ConfigError(f"{WHERE}.http_uri.timeout", "must be above 0")
    try:
        uri_port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError as err:
        raise ConfigError(f"{WHERE}.http_uri.uri", str(err)) from err
    host, port = parts.hostname, uri_port
    if uri.cluster in clusters:
        address = parse_address(clusters[uri.cluster], f"clusters.{uri.cluster}")
        host, port = address.host, address.port
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    headers = tuple(
        (
            option.header.key.lower().encode(),
            option.header.raw_value or option.header.value.encode(),
        )
        for option in http.request_headers_to_add
    )
    tls = _tls(parts.scheme, channel)
    return HttpTransport(
        host=host,
        port=port,
        path=path.encode(),
        authority=parts.netloc.rpartition("@")[2].encode(),
        timeout=timeout,
        headers=headers,
        tls=tls,
        server_hostname=(channel.authority or parts.hostname) if tls else None,
    )


def _tls(scheme: str, channel: ChannelFlags) -> ssl.SSLContext | None:
    if scheme == "http":
        if channel.tls:
            raise ConfigError(
                "--processor-ca", f"the http_service uri is http://; use https:// for TLS ({WHERE})"
            )
        return None
    if (channel.cert is None) != (channel.key is None):
        raise ConfigError("--processor-cert", "--processor-cert and --processor-key go together")
    try:
        context = ssl.create_default_context(cafile=channel.ca)
        if channel.cert is not None:
            context.load_cert_chain(channel.cert, channel.key)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(
            "--processor-ca", f"cannot load the processor's TLS files: {err}"
        ) from err
    context.set_alpn_protocols(["http/1.1"])
    return context
