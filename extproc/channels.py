"""How the processor channel is built: its gRPC target, channel arguments and credentials.

Pure configuration (no channel is opened here): ``extproc.config`` calls :func:`channel_setup`
with what the ``grpc_service`` and the ``--processor-*`` flags say, and
``extproc.io.processor`` hands the result to ``grpc.secure_channel``/``insecure_channel``.

Targets are anything gRPC resolves: ``HOST:PORT``, ``dns:///HOST:PORT``, ``ipv4:A:P,B:Q``,
``ipv6:…``, ``unix:/path``, ``unix-abstract:name``, ``xds:///name``. Unless the target is
``xds:`` (the control plane picks the policy there) or the channel arguments choose a policy,
streams are spread over every resolved address with ``round_robin``, as Envoy's clusters do;
gRPC's own default, ``pick_first``, would send everything to one processor.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import grpc_service_pb2

from extproc.errors import ConfigError

ChannelArgs = tuple[tuple[str, str | int], ...]

LB_POLICIES = ("round_robin", "pick_first")
DEFAULT_LB_POLICY = "round_robin"
DEFAULT_KEEPALIVE_TIMEOUT = 20.0
# Target schemes gRPC resolves by itself; anything else must be HOST:PORT (gRPC's default,
# dns). An unknown scheme would otherwise be resolved as a DNS name and fail obscurely.
_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds"})
_HOST_PORT = re.compile(r"(\[[^\]]+\]|[^:\[\]/\s]+):\d{1,5}")
_XDS_BOOTSTRAP = ("GRPC_XDS_BOOTSTRAP", "GRPC_XDS_BOOTSTRAP_CONFIG")
_LB_ARGS = frozenset({"grpc.service_config", "grpc.lb_policy_name"})


@dataclass(frozen=True, slots=True)
class ChannelFlags:
    """The ``--processor-*`` flags; None means "not given" (the config file decides)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    authority: str | None = None
    lb_policy: str | None = None
    keepalive_time: float | None = None
    keepalive_timeout: float | None = None

    @property
    def tls(self) -> bool:
        return any(v is not None for v in (self.ca, self.cert, self.key))


@dataclass(frozen=True, slots=True)
class ChannelSetup:
    credentials: grpc.ChannelCredentials | None
    authority: str | None
    channel_args: ChannelArgs


def check_target(target: str, where: str) -> str:
    """``target`` if gRPC can resolve it; a ConfigError naming ``where`` otherwise."""
    scheme, sep, rest = target.partition(":")
    if sep and scheme in _SCHEMES:
        if not rest.strip("/"):
            raise ConfigError(where, f"{target!r} names no address")
        if scheme == "xds" and not any(os.environ.get(name) for name in _XDS_BOOTSTRAP):
            raise ConfigError(
                where,
                f"{target!r} needs an xDS bootstrap: set GRPC_XDS_BOOTSTRAP to its file"
                " (or GRPC_XDS_BOOTSTRAP_CONFIG to its JSON)",
            )
        return target
    if not _HOST_PORT.fullmatch(target):
        raise ConfigError(
            where,
            f"expected a gRPC target (HOST:PORT, dns:///HOST:PORT, ipv4:A:P,B:Q, unix:/PATH,"
            f" xds:///NAME), got {target!r}",
        )
    return target


def channel_setup(
    target: str,
    google: grpc_service_pb2.GrpcService.GoogleGrpc | None,
    authority: str | None,
    flags: ChannelFlags,
) -> ChannelSetup:
    """Credentials, authority and channel arguments: the flags over the google_grpc config."""
    args: dict[str, str | int] = {}
    credentials = None
    if google is not None:
        args.update(_channel_args(google))
        credentials = _config_credentials(google)
    if (flags.cert is None) != (flags.key is None):
        raise ConfigError("--processor-cert", "--processor-cert and --processor-key go together")
    if flags.tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(flags.ca, "--processor-ca"),
            private_key=_read(flags.key, "--processor-key"),
            certificate_chain=_read(flags.cert, "--processor-cert"),
        )
    if flags.authority is not None:
        authority = flags.authority
        if credentials is not None:
            # The name the processor's certificate must carry, and the SNI sent.
            args["grpc.ssl_target_name_override"] = flags.authority
    if flags.lb_policy is not None:
        args["grpc.service_config"] = _lb_service_config(flags.lb_policy)
    elif not target.startswith("xds:") and not _LB_ARGS & args.keys():
        args["grpc.service_config"] = _lb_service_config(DEFAULT_LB_POLICY)
    if flags.keepalive_time is not None:
        args.update(keepalive_args(flags.keepalive_time, flags.keepalive_timeout))
    elif flags.keepalive_timeout is not None:
        raise ConfigError("--processor-keepalive-timeout", "needs --processor-keepalive-time")
    return ChannelSetup(credentials, authority, tuple(sorted(args.items())))


def keepalive_args(interval: float, timeout: float | None) -> dict[str, int]:
    """Ping the processor every ``interval`` seconds, even between streams, and drop the
    connection when a ping is not answered within ``timeout`` (default 20 s, gRPC's)."""
    timeout_ms = round((DEFAULT_KEEPALIVE_TIMEOUT if timeout is None else timeout) * 1000)
    return {
        "grpc.keepalive_time_ms": round(interval * 1000),
        "grpc.keepalive_timeout_ms": timeout_ms,
        # What gRPC 1.85's transport actually waits for a ping's ack (default 60 s):
        # keepalive_timeout_ms alone leaves a silent peer undetected for a minute.
        "grpc.http2.ping_timeout_ms": timeout_ms,
        "grpc.keepalive_permit_without_calls": 1,
        # gRPC stops pinging after two pings without data unless told otherwise.
        "grpc.http2.max_pings_without_data": 0,
    }


def _lb_service_config(policy: str) -> str:
    return json.dumps({"loadBalancingConfig": [{policy: {}}]})


def _channel_args(google: grpc_service_pb2.GrpcService.GoogleGrpc) -> Mapping[str, str | int]:
    """google_grpc.channel_args, as Envoy passes them to the gRPC library: verbatim."""
    args: dict[str, str | int] = {}
    for name, value in google.channel_args.args.items():
        kind = value.WhichOneof("value_specifier")
        if kind is None:
            raise ConfigError(
                f"ext_proc.grpc_service.google_grpc.channel_args.args.{name}",
                "needs string_value or int_value",
            )
        args[name] = getattr(value, kind)
    return args


def _config_credentials(google: grpc_service_pb2.GrpcService.GoogleGrpc) -> Any:
    if not google.HasField("channel_credentials"):
        return None
    creds = google.channel_credentials
    if creds.WhichOneof("credential_specifier") != "ssl_credentials":
        raise ConfigError(
            "ext_proc.grpc_service.google_grpc.channel_credentials",
            "only ssl_credentials is supported by extproc",
        )
    ssl = creds.ssl_credentials
    where = "ext_proc.grpc_service.google_grpc.channel_credentials.ssl_credentials"
    return grpc.ssl_channel_credentials(
        root_certificates=_data_source(ssl.root_certs, f"{where}.root_certs"),
        private_key=_data_source(ssl.private_key, f"{where}.private_key"),
        certificate_chain=_data_source(ssl.cert_chain, f"{where}.cert_chain"),
    )


def _data_source(source: Any, where: str) -> bytes | None:
    kind = source.WhichOneof("specifier")
    if kind is None:
        return None
    if kind == "filename":
        return _read(source.filename, where)
    if kind == "inline_bytes":
        return bytes(source.inline_bytes)
    if kind == "inline_string":
        return str(source.inline_string).encode()
    raise ConfigError(where, f"{kind} is not supported by extproc")


def _read(path: str | None, where: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(where, f"cannot read {path}: {err.strerror}") from err
