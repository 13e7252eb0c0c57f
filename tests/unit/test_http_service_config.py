"""http_service in the filter config: accepted in the three shapes, refused where Envoy
refuses it (or where extproc says why), each refusal naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.config import FILTER_TYPE, build_config, parse_file_data
from extproc.errors import ConfigError

GIVEN = {"listen": ":1", "upstream": "127.0.0.1:2"}
SERVICE = {
    "http_service": {
        "http_uri": {"uri": "http://proc.local:8081/process", "cluster": "p", "timeout": "1s"},
        "request_headers_to_add": [{"header": {"key": "X-Token", "value": "t"}}],
    }
}


@pytest.mark.parametrize("shape", ["bare", "http_filters entry", "extproc file"])
def test_http_service_in_each_shape(shape: str) -> None:
    data: dict[str, Any] = {"http_service": SERVICE}
    if shape == "http_filters entry":
        data = {
            "name": "envoy.filters.http.ext_proc",
            "typed_config": {"@type": FILTER_TYPE, **data},
        }
    elif shape == "extproc file":
        data = {"ext_proc": data, "clusters": {"p": "127.0.0.1:9"}}
    http = build_config(parse_file_data(data), GIVEN, {}).filter.processor.http
    assert http is not None
    assert (http.path, http.authority, http.timeout) == (b"/process", b"proc.local:8081", 1.0)
    assert http.headers == ((b"x-token", b"t"),)
    # The cluster entry says where to connect; without one, the URI's own host and port.
    expected = ("127.0.0.1", 9) if shape == "extproc file" else ("proc.local", 8081)
    assert (http.host, http.port) == expected


def with_uri(**uri: Any) -> dict[str, Any]:
    return {"http_service": {"http_service": {"http_uri": uri}}}


@pytest.mark.parametrize(
    ("data", "given", "field", "detail"),
    [
        (
            {"http_service": SERVICE, "grpc_service": {"envoy_grpc": {"cluster_name": "x"}}},
            {},
            "ext_proc.http_service",
            "exactly one of grpc_service and http_service",
        ),
        (
            {"http_service": SERVICE, "processing_mode": {"request_body_mode": "BUFFERED"}},
            {},
            "ext_proc.processing_mode.request_body_mode",
            "must be NONE with http_service",
        ),
        (
            {"http_service": SERVICE, "processing_mode": {"response_trailer_mode": "SEND"}},
            {},
            "ext_proc.processing_mode.response_trailer_mode",
            "cannot be SEND with http_service",
        ),
        (
            {"http_service": SERVICE, "observability_mode": True},
            {},
            "ext_proc.observability_mode",
            "is not supported with http_service",
        ),
        (
            {"http_service": SERVICE},
            {"processor": "127.0.0.1:9"},
            "--processor",
            "is a gRPC target",
        ),
        (
            with_uri(uri="http://p/x"),
            {},
            "ext_proc.http_service.http_service.http_uri.timeout",
            "is required",
        ),
        (
            with_uri(uri="ftp://p/x", timeout="1s"),
            {},
            "ext_proc.http_service.http_service.http_uri.uri",
            "expected http://HOST[:PORT]/PATH",
        ),
        (
            with_uri(timeout="1s"),
            {},
            "ext_proc.http_service.http_service.http_uri.uri",
            "is required",
        ),
        (
            with_uri(uri="http://p/x", timeout="0s"),
            {},
            "ext_proc.http_service.http_service.http_uri.timeout",
            "must be above 0",
        ),
        ({"http_service": SERVICE}, {"processor_ca": __file__}, "--processor-ca", "use https://"),
        (
            {"http_service": SERVICE},
            {"cluster": {"p": "dns:///proc:80"}},
            "clusters.p",
            "expected HOST:PORT",
        ),
    ],
    ids=[
        "grpc-and-http",
        "body-mode",
        "trailer-mode",
        "observability",
        "processor-flag",
        "no-timeout",
        "not-http",
        "no-uri",
        "zero-timeout",
        "tls-on-http",
        "cluster-not-host-port",
    ],
)
def test_refused_by_name(
    data: dict[str, Any], given: dict[str, Any], field: str, detail: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(parse_file_data(data), {**GIVEN, **given}, {})
    assert info.value.option == field
    assert detail in info.value.message


def test_a_route_cannot_switch_an_http_filter_to_grpc() -> None:
    file = parse_file_data(
        {
            "ext_proc": {"http_service": SERVICE},
            "routes": [
                {
                    "prefix": "/grpc",
                    "overrides": {"grpc_service": {"envoy_grpc": {"cluster_name": "x"}}},
                }
            ],
        }
    )
    with pytest.raises(ConfigError) as info:
        build_config(file, GIVEN, {})
    assert info.value.option == "routes[0].overrides.grpc_service"
