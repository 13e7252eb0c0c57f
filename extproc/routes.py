"""Per-route ext_proc behaviour: Envoy's ``ExtProcPerRoute``, chosen by path prefix.

extproc has no route table of its own, so its config file lists routes as
``{prefix: "/api", overrides: {...}}`` or ``{prefix: "/health", disabled: true}``, the rest of
each entry being the ``ExtProcPerRoute`` message as Envoy users write it. The first route whose
prefix starts the request's original ``:path`` applies (Envoy's routes also match in order).
Override semantics are Envoy's (docs/protocol.md, Control): ``processing_mode`` replaces the
whole mode, ``grpc_service`` the service, ``failure_mode_allow`` the flag, each ``metadata_options``
namespace list the list, and ``grpc_initial_metadata`` entries are merged into the service's
``initial_metadata`` by key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2
from google.protobuf import json_format

from extproc.errors import ConfigError

_SUPPORTED_OVERRIDES = frozenset(
    {
        "processing_mode",
        "grpc_service",
        "failure_mode_allow",
        "grpc_initial_metadata",
        "metadata_options",
    }
)
_DISABLED_MODE = {
    "request_header_mode": "SKIP",
    "response_header_mode": "SKIP",
    "request_body_mode": "NONE",
    "response_body_mode": "NONE",
    "request_trailer_mode": "SKIP",
    "response_trailer_mode": "SKIP",
}


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """A route as the file gives it."""

    prefix: str
    per_route: ext_proc_pb2.ExtProcPerRoute


def parse_routes(data: Any) -> tuple[RouteSpec, ...]:
    if not isinstance(data, list):
        raise ConfigError("routes", "expected a list of {prefix: ..., disabled|overrides: ...}")
    specs = []
    for i, entry in enumerate(data):
        where = f"routes[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("prefix"), str):
            raise ConfigError(f"{where}.prefix", "each route needs a string prefix")
        body = {k: v for k, v in entry.items() if k != "prefix"}
        message = ext_proc_pb2.ExtProcPerRoute()
        try:
            json_format.ParseDict(body, message)
        except json_format.ParseError as err:
            raise ConfigError(where, str(err).splitlines()[0]) from err
        kind = message.WhichOneof("override")
        if kind is None:
            raise ConfigError(where, "needs disabled: true or overrides: {...}")
        if kind == "disabled" and not message.disabled:
            raise ConfigError(f"{where}.disabled", "must be true when given (as in Envoy)")
        specs.append(RouteSpec(entry["prefix"], message))
    return tuple(specs)


def effective_filter(
    base: ext_proc_pb2.ExternalProcessor, spec: RouteSpec, where: str
) -> ext_proc_pb2.ExternalProcessor:
    """The filter configuration one route runs with."""
    merged = ext_proc_pb2.ExternalProcessor()
    merged.CopyFrom(base)
    if spec.per_route.WhichOneof("override") == "disabled":
        json_format.ParseDict({"processing_mode": _DISABLED_MODE}, merged)
        return merged
    overrides = spec.per_route.overrides
    for descriptor, _ in overrides.ListFields():
        if descriptor.name not in _SUPPORTED_OVERRIDES:
            raise ConfigError(f"{where}.overrides.{descriptor.name}", "is not supported by extproc")
    if overrides.HasField("processing_mode"):
        merged.processing_mode.CopyFrom(overrides.processing_mode)
    switches = overrides.HasField("grpc_service") or bool(overrides.grpc_initial_metadata)
    if base.HasField("http_service") and switches:
        name = "grpc_service" if overrides.HasField("grpc_service") else "grpc_initial_metadata"
        raise ConfigError(
            f"{where}.overrides.{name}",
            "the filter's processor is its http_service: a route cannot switch it to gRPC",
        )
    if overrides.HasField("grpc_service"):
        merged.grpc_service.CopyFrom(overrides.grpc_service)
    if overrides.HasField("failure_mode_allow"):
        merged.failure_mode_allow = overrides.failure_mode_allow.value
    _merge_metadata_options(merged.metadata_options, overrides.metadata_options)
    _merge_initial_metadata(merged.grpc_service.initial_metadata, overrides.grpc_initial_metadata)
    return merged


def _merge_metadata_options(target: Any, override: Any) -> None:
    for field in ("forwarding_namespaces", "receiving_namespaces"):
        if override.HasField(field):
            getattr(target, field).CopyFrom(getattr(override, field))


def _merge_initial_metadata(target: Any, extra: Sequence[Any]) -> None:
    for header in extra:
        existing = [hv for hv in target if hv.key.lower() == header.key.lower()]
        if existing:
            existing[0].CopyFrom(header)
        else:
            target.add().CopyFrom(header)
