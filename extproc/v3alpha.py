"""The v3alpha ``ExternalProcessor`` (Envoy before 1.20), read as the v3 message it became.

xds-protos has no v3alpha classes, so a v3alpha config is taken in its proto3 JSON form: each
field v3alpha had is renamed to its v3 counterpart (all kept their names and numbers), and the
one whose meaning did not survive, ``async_mode``, is refused with what to use instead. A field
that only v3 has is refused too, as Envoy would refuse it under the v3alpha type: the config
says which API it was written for.
"""

from __future__ import annotations

from typing import Any

from extproc.errors import ConfigError

FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3alpha.ExternalProcessor"
# v3alpha's fields, by their proto and JSON names, with the v3 field each became.
_FIELDS = {
    "grpc_service": "grpc_service",
    "failure_mode_allow": "failure_mode_allow",
    "processing_mode": "processing_mode",
    "request_attributes": "request_attributes",
    "response_attributes": "response_attributes",
    "message_timeout": "message_timeout",
    "stat_prefix": "stat_prefix",
}
_ASYNC = ("async_mode", "asyncMode")
_JSON_NAMES = {
    "".join([n.split("_")[0], *(p.title() for p in n.split("_")[1:])]): n for n in _FIELDS
}
_BODY_MODES = frozenset({"NONE", "STREAMED", "BUFFERED", "BUFFERED_PARTIAL", 0, 1, 2, 3})


def looks_v3alpha(data: dict[str, Any]) -> bool:
    """A bare message with no ``@type`` is v3alpha when it sets what only v3alpha had."""
    return any(key in data for key in _ASYNC)


def to_v3(data: dict[str, Any], where: str) -> dict[str, Any]:
    """The v3 JSON form of the v3alpha message ``data`` (``@type`` already taken off)."""
    v3: dict[str, Any] = {}
    for key, value in data.items():
        if key in _ASYNC:
            if value is True or value == "true":
                raise ConfigError(
                    f"{where}.{key}",
                    "v3alpha's async_mode never worked in Envoy and did not survive into v3; for"
                    " a processor that only observes, use observability_mode: true with the v3"
                    " @type (type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3"
                    ".ExternalProcessor)",
                )
            continue  # false: the default, nothing to map
        name = key if key in _FIELDS else _JSON_NAMES.get(key)
        if name is None:
            raise ConfigError(
                f"{where}.{key}",
                "is not a field of the v3alpha ExternalProcessor (it has "
                + ", ".join([*_FIELDS, "async_mode"])
                + "); a v3 field needs the v3 @type",
            )
        if name == "processing_mode" and isinstance(value, dict):
            _check_body_modes(value, f"{where}.{key}")
        v3[_FIELDS[name]] = value
    return v3


def _check_body_modes(mode: dict[str, Any], where: str) -> None:
    for key, value in mode.items():
        if "body" in key.lower() and value not in _BODY_MODES:
            raise ConfigError(
                f"{where}.{key}",
                f"{value!r} is not a v3alpha body mode (NONE, STREAMED, BUFFERED,"
                " BUFFERED_PARTIAL); a v3 mode needs the v3 @type",
            )
