"""Configuration: Envoy's ExternalProcessor from YAML/JSON, flags over file, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.addresses import Address, InheritedSocket, parse_address, parse_listen
from extproc.config import (
    FileConfig,
    build_config,
    check_reloadable,
    load_file,
    parse_file_data,
    parse_filter,
)
from extproc.errors import ConfigError
from extproc.options import parse_duration

BASE = {"listen": ":8080", "upstream": "127.0.0.1:8000", "processor": "127.0.0.1:9000"}


def error_of(call: object, *args: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        call(*args)  # type: ignore[operator]
    return info.value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (":8080", Address("0.0.0.0", 8080)),
        ("127.0.0.1:1", Address("127.0.0.1", 1)),
        ("[::1]:80", Address("::1", 80)),
        ("example.com:443", Address("example.com", 443)),
    ],
)
def test_parse_address(value: str, expected: Address) -> None:
    assert parse_address(value, "--listen") == expected


@pytest.mark.parametrize("value", ["8080", "host:", "host:99999", "[::1]", "a:b:c"])
def test_parse_address_errors_name_the_option(value: str) -> None:
    assert error_of(parse_address, value, "--listen").option == "--listen"


def test_parse_duration() -> None:
    assert parse_duration("200ms", "x") == 0.2
    assert parse_duration("1.5s", "x") == 1.5
    assert parse_duration("2", "x") == 2.0
    assert error_of(parse_duration, "soon", "--message-timeout").option == "--message-timeout"


@pytest.mark.parametrize(
    ("data", "option"),
    [
        ({"foo": 1}, "ext_proc.foo"),
        ({"processing_mode": {"bogus": 1}}, "ext_proc.processing_mode.bogus"),
        (
            {"processing_mode": {"request_header_mode": "LOUD"}},
            "ext_proc.processing_mode.request_header_mode",
        ),
        ({"message_timeout": "soon"}, "ext_proc.message_timeout"),
        ({"failure_mode_allow": "yes"}, "ext_proc.failure_mode_allow"),
        (
            {"typed_config": {"@type": "type.googleapis.com/other.Thing"}},
            "ext_proc.typed_config.@type",
        ),
    ],
    ids=["unknown", "nested-unknown", "bad-enum", "bad-duration", "bad-bool", "wrong-type-url"],
)
def test_filter_errors_name_the_field(data: dict[str, object], option: str) -> None:
    assert error_of(parse_filter, data, "ext_proc").option == option


def test_filter_accepts_an_envoy_http_filters_entry() -> None:
    message = parse_filter(
        {
            "name": "envoy.filters.http.ext_proc",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3"
                ".ExternalProcessor",
                "failure_mode_allow": True,
                "processingMode": {"responseHeaderMode": "SKIP"},
            },
        },
        "ext_proc",
    )
    assert message.failure_mode_allow
    assert message.processing_mode.response_header_mode == message.processing_mode.SKIP


@pytest.mark.parametrize(
    ("data", "option"),
    [
        (
            {"processing_mode": {"request_body_mode": "GRPC"}},
            "ext_proc.processing_mode.request_body_mode",
        ),
        (
            {"processing_mode": {"response_body_mode": "FULL_DUPLEX_STREAMED"}},
            "ext_proc.processing_mode.response_trailer_mode",
        ),
        (
            {"allowed_override_modes": [{"request_body_mode": "GRPC"}]},
            "ext_proc.allowed_override_modes[0].request_body_mode",
        ),
        (
            {
                "grpc_service": {
                    "google_grpc": {"target_uri": "x:1", "stat_prefix": "p"},
                    "retry_policy": {},
                }
            },
            "ext_proc.grpc_service.retry_policy",
        ),
        ({"message_timeout": "4000s"}, "ext_proc.message_timeout"),
    ],
    ids=[
        "grpc-body-mode",
        "duplex-needs-trailers",
        "grpc-override",
        "grpc-retry",
        "timeout-range",
    ],
)
def test_unsupported_fields_are_refused_by_name(data: dict[str, object], option: str) -> None:
    file = FileConfig(filter=parse_filter(data, "ext_proc"))
    assert error_of(build_config, file, BASE).option == option


def test_google_grpc_target_and_initial_metadata_and_timeout() -> None:
    file = FileConfig(
        filter=parse_filter(
            {
                "grpc_service": {
                    "google_grpc": {"target_uri": "127.0.0.1:7000", "stat_prefix": "ext"},
                    "timeout": "3s",
                    "initial_metadata": [{"key": "X-Token", "value": "t"}],
                }
            },
            "ext_proc",
        )
    )
    config = build_config(file, {"listen": ":1", "upstream": "127.0.0.1:2"})
    assert config.filter.processor.target == "127.0.0.1:7000"
    assert config.filter.processor.stream_timeout == 3.0
    assert config.filter.processor.metadata == (("x-token", "t"),)


def test_processor_flag_overrides_the_file() -> None:
    file = FileConfig(
        filter=parse_filter(
            {"grpc_service": {"google_grpc": {"target_uri": "127.0.0.1:7000"}}}, "ext_proc"
        )
    )
    assert build_config(file, BASE).filter.processor.target == "127.0.0.1:9000"


def test_envoy_grpc_cluster_resolved_through_clusters() -> None:
    file = parse_file_data(
        {
            "listen": ":8080",
            "upstream": "127.0.0.1:8000",
            "clusters": {"ext_proc_cluster": "127.0.0.1:9100"},
            "ext_proc": {"grpc_service": {"envoy_grpc": {"cluster_name": "ext_proc_cluster"}}},
        }
    )
    config = build_config(file, {})
    assert config.filter.processor.target == "127.0.0.1:9100"
    assert config.filter.processor.authority == "ext_proc_cluster"
    assert config.listen == Address("0.0.0.0", 8080)


def test_envoy_grpc_unknown_cluster_is_an_error() -> None:
    file = FileConfig(
        filter=parse_filter({"grpc_service": {"envoy_grpc": {"cluster_name": "nope"}}}, "ext_proc")
    )
    err = error_of(build_config, file, {"listen": ":1", "upstream": "127.0.0.1:2"})
    assert err.option == "ext_proc.grpc_service.envoy_grpc.cluster_name"
    assert "--cluster nope=HOST:PORT" in err.message


def test_cluster_flag_resolves_too() -> None:
    file = FileConfig(
        filter=parse_filter({"grpc_service": {"envoy_grpc": {"cluster_name": "c"}}}, "ext_proc")
    )
    flags = {"listen": ":1", "upstream": "127.0.0.1:2", "cluster": {"c": "127.0.0.1:5"}}
    assert build_config(file, flags).filter.processor.target == "127.0.0.1:5"


def test_no_processor_is_an_error() -> None:
    assert error_of(build_config, None, {"listen": ":1", "upstream": "h:2"}).option == (
        "--processor"
    )


def test_unknown_top_level_key_in_extproc_file() -> None:
    assert error_of(parse_file_data, {"ext_proc": {}, "listne": ":1"}).option == "listne"


def test_flags_override_filter_fields() -> None:
    file = FileConfig(
        filter=parse_filter(
            {
                "failure_mode_allow": True,
                "message_timeout": "1s",
                "processing_mode": {"request_header_mode": "SKIP"},
            },
            "ext_proc",
        )
    )
    flags = {
        "listen": ":1",
        "upstream": "127.0.0.1:2",
        "processor": "127.0.0.1:3",
        "failure_mode_allow": False,
        "message_timeout": "50ms",
        "request_header_mode": "send",
        "status_on_error": 503,
    }
    exchange = build_config(file, flags).filter.exchange
    assert not exchange.failure_mode_allow
    assert exchange.message_timeout == 0.05
    assert exchange.processing_mode.request_header_mode == exchange.processing_mode.SEND
    assert exchange.status_on_error == 503


def test_status_on_error_outside_4xx_5xx_means_500() -> None:
    file = FileConfig(filter=parse_filter({"status_on_error": {"code": 302}}, "ext_proc"))
    assert build_config(file, BASE).filter.exchange.status_on_error == 500


def test_mutation_rules_are_compiled() -> None:
    file = FileConfig(
        filter=parse_filter(
            {
                "mutation_rules": {
                    "allow_all_routing": True,
                    "disallow_expression": {"regex": "x-secret.*"},
                }
            },
            "ext_proc",
        )
    )
    rules = build_config(file, BASE).filter.exchange.rules
    assert rules.allow_all_routing
    assert rules.disallow_expression is not None
    assert rules.disallow_expression.fullmatch(b"x-secret-1")


def test_load_file_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "filter.yaml"
    yaml_file.write_text("failure_mode_allow: true\nmessage_timeout: 0.5s\n")
    assert load_file(yaml_file).filter.failure_mode_allow
    json_file = tmp_path / "filter.json"
    json_file.write_text('{"failureModeAllow": true}')
    assert load_file(json_file).filter.failure_mode_allow


def test_load_file_errors(tmp_path: Path) -> None:
    assert "cannot read" in error_of(load_file, tmp_path / "missing.yaml").message
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [\n")
    assert "not valid YAML" in error_of(load_file, bad).message
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    assert "mapping" in error_of(load_file, listy).message


@pytest.mark.parametrize(
    ("data", "option"),
    [
        (
            {"request_attributes": ["request.path", "request.bogus"]},
            "ext_proc.request_attributes[1]",
        ),
        (
            {"metadata_options": {"receiving_namespaces": {"typed": ["ns"]}}},
            "ext_proc.metadata_options.receiving_namespaces.typed",
        ),
        (
            {"metadata_options": {"cluster_metadata_forwarding_namespaces": {"untyped": ["c"]}}},
            "ext_proc.metadata_options.cluster_metadata_forwarding_namespaces",
        ),
        (
            {"forward_rules": {"allowed_headers": {"patterns": [{"custom": {}}]}}},
            "ext_proc.forward_rules.allowed_headers.patterns[0]",
        ),
    ],
    ids=["unknown-attribute", "typed-metadata", "cluster-metadata", "custom-matcher"],
)
def test_control_fields_refused_by_name(data: dict[str, object], option: str) -> None:
    file = FileConfig(filter=parse_filter(data, "ext_proc"))
    assert error_of(build_config, file, BASE).option == option


def test_control_fields_are_built() -> None:
    file = parse_file_data(
        {
            "ext_proc": {
                "observability_mode": True,
                "deferred_close_timeout": "1s",
                "max_message_timeout": "2s",
                "request_attributes": ["request.path"],
                "metadata_options": {
                    "receiving_namespaces": {"untyped": ["a"]},
                    "forwarding_namespaces": {"untyped": ["b"]},
                },
            },
            "metadata_headers": {"a": "X-A-Meta"},
        }
    )
    exchange = build_config(file, BASE).filter.exchange
    assert exchange.observability_mode and exchange.deferred_close_timeout == 1.0
    assert exchange.max_message_timeout == 2.0
    assert exchange.request_attributes == ("request.path",)
    assert exchange.receiving_namespaces == frozenset({"a"})
    assert exchange.forwarding_namespaces == ("b",)
    assert exchange.metadata_headers == (("a", b"x-a-meta"),)


def test_routes_pick_settings_by_prefix_in_order() -> None:
    file = parse_file_data(
        {
            "ext_proc": {
                "failure_mode_allow": False,
                "grpc_service": {"envoy_grpc": {"cluster_name": "main"}},
            },
            "clusters": {"main": "127.0.0.1:7000", "other": "127.0.0.1:7001"},
            "routes": [
                {"prefix": "/off", "disabled": True},
                {
                    "prefix": "/api",
                    "overrides": {
                        "failure_mode_allow": True,
                        "processing_mode": {"response_body_mode": "BUFFERED"},
                        "grpc_service": {"envoy_grpc": {"cluster_name": "other"}},
                        "grpc_initial_metadata": [{"key": "x-route", "value": "1"}],
                    },
                },
            ],
        }
    )
    config = build_config(file, {"listen": ":1", "upstream": "127.0.0.1:2"})
    off, _ = config.filter.for_path(b"/off/x")
    assert off.processing_mode.request_header_mode == off.processing_mode.SKIP
    api, processor = config.filter.for_path(b"/api/v1")
    assert api.failure_mode_allow
    assert api.processing_mode.response_body_mode == api.processing_mode.BUFFERED
    assert api.processing_mode.response_header_mode == 0  # replaced whole, not merged
    assert processor.target == "127.0.0.1:7001"
    assert processor.metadata == (("x-route", "1"),)
    assert config.filter.for_path(b"/else") == (config.filter.exchange, config.filter.processor)


@pytest.mark.parametrize(
    ("routes", "option"),
    [
        ([{"disabled": True}], "routes[0].prefix"),
        ([{"prefix": "/a"}], "routes[0]"),
        ([{"prefix": "/a", "disabled": False}], "routes[0].disabled"),
        (
            [{"prefix": "/a", "overrides": {"request_attributes": ["request.path"]}}],
            "routes[0].overrides.request_attributes",
        ),
        ("not a list", "routes"),
    ],
    ids=["no-prefix", "no-override", "disabled-false", "unsupported-override", "not-a-list"],
)
def test_route_errors_name_the_entry(routes: object, option: str) -> None:
    def build() -> None:
        file = parse_file_data({"ext_proc": {}, "routes": routes})
        build_config(file, BASE)

    assert error_of(build).option == option


def test_metadata_headers_must_name_headers() -> None:
    assert (
        error_of(parse_file_data, {"ext_proc": {}, "metadata_headers": {"ns": "bad name"}}).option
        == "metadata_headers.ns"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("fd://3", InheritedSocket(3)),
        ("fd://12", InheritedSocket(12)),
        (":80", Address("0.0.0.0", 80)),
    ],
)
def test_parse_listen_takes_inherited_descriptors(
    value: str, expected: Address | InheritedSocket
) -> None:
    assert parse_listen(value, "--listen") == expected
    assert str(expected) == (value if value.startswith("fd://") else "0.0.0.0:80")


@pytest.mark.parametrize("value", ["fd://", "fd://x", "fd://-1"])
def test_parse_listen_fd_errors_name_the_option(value: str) -> None:
    err = error_of(parse_listen, value, "--listen")
    assert err.option == "--listen" and "fd://N" in err.message


def test_listen_fd_in_a_built_config() -> None:
    config = build_config(None, {**BASE, "listen": "fd://3"})
    assert config.listen == InheritedSocket(3)


def test_reload_may_change_the_filter_processor_and_upstream() -> None:
    running = build_config(None, BASE)
    file = parse_file_data({"ext_proc": {"failure_mode_allow": True}, "upstream": "10.0.0.1:80"})
    flags = {**BASE, "upstream": None, "processor": "10.0.0.2:9000"}
    check_reloadable(running, build_config(file, flags))


@pytest.mark.parametrize(
    ("change", "option"),
    [
        ({"listen": ":8081"}, "listen"),
        ({"admin": ":9901"}, "--admin"),
        ({"threads": 4}, "--threads"),
    ],
    ids=["listen", "admin", "threads"],
)
def test_reload_refuses_what_only_a_restart_applies(change: dict[str, object], option: str) -> None:
    running = build_config(None, BASE)
    new = build_config(None, {**BASE, **change})
    err = error_of(check_reloadable, running, new)
    assert err.option == option and "restart" in err.message


def test_reload_refuses_a_new_stat_prefix() -> None:
    running = build_config(None, BASE)
    new = build_config(parse_file_data({"stat_prefix": "other"}), BASE)
    err = error_of(check_reloadable, running, new)
    assert err.option == "ext_proc.stat_prefix"


@pytest.mark.parametrize(
    ("where", "option"),
    [("file", "grpc_client"), ("flag", "--grpc-client"), ("env", "EXTPROC_GRPC_CLIENT")],
)
def test_an_unknown_grpc_client_is_refused_by_name(
    where: str, option: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EXTPROC_GRPC_CLIENT", raising=False)
    if where == "file":
        err = error_of(parse_file_data, {"ext_proc": {}, "grpc_client": "aio"})
    elif where == "flag":
        err = error_of(build_config, None, {**BASE, "grpc_client": "aio"})
    else:
        monkeypatch.setenv("EXTPROC_GRPC_CLIENT", "aio")
        err = error_of(build_config, None, BASE)
    assert err.option == option
    assert "direct, stub" in err.message
