"""A v3alpha ExternalProcessor config (extproc.v3alpha): each field to its v3 counterpart, the
rest refused naming the field and what to use instead."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.config import FILTER_TYPE, build_config, parse_file_data, parse_filter
from extproc.errors import ConfigError
from extproc.v3alpha import FILTER_TYPE as V3ALPHA_TYPE

EVERY_FIELD = {
    "grpc_service": {"google_grpc": {"target_uri": "127.0.0.1:9000", "stat_prefix": "p"}},
    "failure_mode_allow": True,
    "processing_mode": {
        "request_header_mode": "SEND",
        "response_header_mode": "SKIP",
        "request_body_mode": "BUFFERED_PARTIAL",
        "response_body_mode": "STREAMED",
        "request_trailer_mode": "SEND",
        "response_trailer_mode": "SKIP",
    },
    "async_mode": False,
    "request_attributes": ["request.path"],
    "response_attributes": ["response.code"],
    "message_timeout": "0.5s",
    "stat_prefix": "old",
}


def v3_of(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k != "async_mode"}


@pytest.mark.parametrize("shape", ["http_filters entry", "bare with @type", "bare", "camelCase"])
def test_every_v3alpha_field_maps_to_its_v3_counterpart(shape: str) -> None:
    expected = parse_filter({"@type": FILTER_TYPE, **v3_of(EVERY_FIELD)}, "ext_proc")
    if shape == "http_filters entry":
        data: dict[str, Any] = {
            "name": "envoy.filters.http.ext_proc",
            "typed_config": {"@type": V3ALPHA_TYPE, **EVERY_FIELD},
        }
    elif shape == "bare with @type":
        data = {"@type": V3ALPHA_TYPE, **EVERY_FIELD}
    elif shape == "bare":
        data = dict(EVERY_FIELD)  # async_mode says it is v3alpha
    else:
        data = {
            "@type": V3ALPHA_TYPE,
            "grpcService": EVERY_FIELD["grpc_service"],
            "failureModeAllow": True,
            "processingMode": EVERY_FIELD["processing_mode"],
            "asyncMode": False,
            "requestAttributes": ["request.path"],
            "responseAttributes": ["response.code"],
            "messageTimeout": "0.5s",
            "statPrefix": "old",
        }
    assert parse_filter(data, "ext_proc") == expected


def test_a_v3alpha_config_builds_the_same_proxy() -> None:
    given = {"listen": ":1", "upstream": "127.0.0.1:2"}
    old = build_config(parse_file_data({"@type": V3ALPHA_TYPE, **EVERY_FIELD}), given, {})
    new = build_config(parse_file_data(v3_of(EVERY_FIELD)), given, {})
    assert old == new


@pytest.mark.parametrize(
    ("data", "field", "detail"),
    [
        ({"async_mode": True}, "ext_proc.async_mode", "use observability_mode: true"),
        (
            {"@type": V3ALPHA_TYPE, "asyncMode": True},
            "ext_proc.asyncMode",
            "use observability_mode: true",
        ),
        (
            {"@type": V3ALPHA_TYPE, "mutation_rules": {}},
            "ext_proc.mutation_rules",
            "is not a field of the v3alpha ExternalProcessor",
        ),
        (
            {
                "@type": V3ALPHA_TYPE,
                "processing_mode": {"request_body_mode": "FULL_DUPLEX_STREAMED"},
            },
            "ext_proc.processing_mode.request_body_mode",
            "is not a v3alpha body mode",
        ),
        (
            {"typed_config": {"@type": V3ALPHA_TYPE, "observability_mode": True}},
            "ext_proc.typed_config.observability_mode",
            "a v3 field needs the v3 @type",
        ),
        (
            {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v2.X"},
            "ext_proc.@type",
            "(or the v3alpha type)",
        ),
    ],
)
def test_what_did_not_survive_is_refused_by_name(
    data: dict[str, Any], field: str, detail: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_filter(data, "ext_proc")
    assert info.value.option == field
    assert detail in info.value.message


def test_the_v3alpha_filter_in_extprocs_own_file() -> None:
    file = parse_file_data(
        {
            "ext_proc": {"@type": V3ALPHA_TYPE, "grpc_service": EVERY_FIELD["grpc_service"]},
            "processor_api": "v3alpha",
        }
    )
    config = build_config(file, {"listen": ":1", "upstream": "127.0.0.1:2"}, {})
    assert config.filter.processor.api == "v3alpha"
    assert config.filter.processor.target == "127.0.0.1:9000"
