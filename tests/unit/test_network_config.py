"""Network configuration: processor targets and channels, upstream lists, listener TLS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from extproc import cli, logs
from extproc.addresses import Address
from extproc.channels import ChannelFlags, channel_setup, check_target
from extproc.config import ProxyConfig, build_config, parse_file_data
from extproc.errors import ConfigError

ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def error_of(call: Any, *args: Any, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        call(*args, **kwargs)
    return info.value


def build(processor: str | None = "127.0.0.1:9000", ext_proc: Any = None, **kw: Any) -> ProxyConfig:
    file = parse_file_data(ext_proc) if ext_proc is not None else None
    upstream = kw.pop("upstream", "127.0.0.1:80")
    flags = dict(listen=":8080", upstream=upstream, processor=processor, **kw)
    return build_config(file, flags)


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:9000",
        "processors.internal:9000",
        "[::1]:9000",
        "dns:///processors:9000",
        "dns://10.0.0.2/processors:9000",
        "ipv4:127.0.0.1:1,127.0.0.1:2",
        "ipv6:[::1]:9000",
        "unix:/run/extproc/processor.sock",
        "unix:///run/processor.sock",
        "unix-abstract:processor",
    ],
)
def test_targets_gRPC_resolves_are_accepted(target: str) -> None:
    assert check_target(target, "--processor") == target


@pytest.mark.parametrize(
    "target", ["processors", "http://processors:9000", "dns:///", "unix:", "a b:1"]
)
def test_other_targets_are_refused_naming_the_option(target: str) -> None:
    assert error_of(check_target, target, "--processor").option == "--processor"


def test_xds_target_needs_a_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRPC_XDS_BOOTSTRAP", raising=False)
    monkeypatch.delenv("GRPC_XDS_BOOTSTRAP_CONFIG", raising=False)
    assert "GRPC_XDS_BOOTSTRAP" in error_of(check_target, "xds:///p", "--processor").message
    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP", "/etc/extproc/xds.json")
    assert check_target("xds:///p", "--processor") == "xds:///p"


def test_round_robin_by_default_but_not_for_xds() -> None:
    plain = channel_setup("dns:///p:1", None, None, ChannelFlags())
    assert dict(plain.channel_args) == {"grpc.service_config": ROUND_ROBIN}
    assert channel_setup("xds:///p", None, None, ChannelFlags()).channel_args == ()


def test_lb_policy_flag() -> None:
    setup = channel_setup("p:1", None, None, ChannelFlags(lb_policy="pick_first"))
    config = json.loads(str(dict(setup.channel_args)["grpc.service_config"]))
    assert config == {"loadBalancingConfig": [{"pick_first": {}}]}


def test_keepalive_flags() -> None:
    setup = channel_setup("p:1", None, None, ChannelFlags(keepalive_time=10, keepalive_timeout=2))
    args = dict(setup.channel_args)
    assert args["grpc.keepalive_time_ms"] == 10000
    assert args["grpc.keepalive_timeout_ms"] == args["grpc.http2.ping_timeout_ms"] == 2000
    assert args["grpc.keepalive_permit_without_calls"] == 1
    assert args["grpc.http2.max_pings_without_data"] == 0
    default = dict(channel_setup("p:1", None, None, ChannelFlags(keepalive_time=10)).channel_args)
    assert default["grpc.keepalive_timeout_ms"] == 20000
    error = error_of(channel_setup, "p:1", None, None, ChannelFlags(keepalive_timeout=2))
    assert error.option == "--processor-keepalive-timeout"


def test_google_grpc_channel_args_pass_through_and_flags_win() -> None:
    google = {
        "target_uri": "p:1",
        "channel_args": {
            "args": {
                "grpc.lb_policy_name": {"string_value": "pick_first"},
                "grpc.keepalive_time_ms": {"int_value": "30000"},
            }
        },
    }
    config = build(None, {"grpc_service": {"google_grpc": google}})
    args = dict(config.filter.processor.channel_args)
    assert args == {"grpc.lb_policy_name": "pick_first", "grpc.keepalive_time_ms": 30000}
    flagged = build(
        None,
        {"grpc_service": {"google_grpc": google}},
        processor_keepalive_time=5,
    )
    assert dict(flagged.filter.processor.channel_args)["grpc.keepalive_time_ms"] == 5000


def test_channel_arg_without_a_value_is_refused() -> None:
    google = {"target_uri": "p:1", "channel_args": {"args": {"grpc.x": {}}}}
    error = error_of(build, None, {"grpc_service": {"google_grpc": google}})
    assert error.option == "ext_proc.grpc_service.google_grpc.channel_args.args.grpc.x"


def test_unsupported_google_grpc_fields_are_refused() -> None:
    google = {"target_uri": "p:1", "call_credentials": [{"access_token": "t"}]}
    error = error_of(build, None, {"grpc_service": {"google_grpc": google}})
    assert error.option == "ext_proc.grpc_service.google_grpc.call_credentials"


def test_target_uri_is_checked() -> None:
    error = error_of(build, None, {"grpc_service": {"google_grpc": {"target_uri": "nope"}}})
    assert error.option == "ext_proc.grpc_service.google_grpc.target_uri"


def test_clusters_take_any_target() -> None:
    config = build(
        None,
        {
            "clusters": {"ext_proc": "ipv4:127.0.0.1:1,127.0.0.1:2"},
            "ext_proc": {"grpc_service": {"envoy_grpc": {"cluster_name": "ext_proc"}}},
        },
    )
    assert config.filter.processor.target == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert config.filter.processor.authority == "ext_proc"


def test_processor_tls_flags(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("not checked until the channel connects")
    config = build(processor_ca=str(pem), processor_authority="p.internal")
    assert config.filter.processor.credentials is not None
    assert config.filter.processor.authority == "p.internal"
    assert (
        dict(config.filter.processor.channel_args)["grpc.ssl_target_name_override"] == "p.internal"
    )
    half = error_of(build, processor_ca=str(pem), processor_cert=str(pem))
    assert half.option == "--processor-cert"
    missing = error_of(build, processor_ca=str(tmp_path / "missing.pem"))
    assert missing.option == "--processor-ca"


def test_authority_without_tls_is_only_the_authority() -> None:
    config = build(processor_authority="p.internal")
    assert config.filter.processor.credentials is None
    assert config.filter.processor.authority == "p.internal"
    assert "grpc.ssl_target_name_override" not in dict(config.filter.processor.channel_args)


def test_upstream_comma_list_and_file_list() -> None:
    config = build(upstream="127.0.0.1:1, 127.0.0.1:2,:3")
    assert config.upstream.addresses == (
        Address("127.0.0.1", 1),
        Address("127.0.0.1", 2),
        Address("127.0.0.1", 3),
    )
    assert (config.upstream.host, config.upstream.port) == ("127.0.0.1", 1)
    file = parse_file_data(
        {"upstream": ["10.0.0.1:80", "10.0.0.2:80"], "ext_proc": {}, "processor": "p:1"}
    )
    config = build_config(file, {"listen": ":1"}, {})
    assert config.upstream.addresses == (Address("10.0.0.1", 80), Address("10.0.0.2", 80))


def test_upstream_errors() -> None:
    assert error_of(build, upstream="127.0.0.1:1,").option == "--upstream"
    error = error_of(build, upstream_ejection_time=10.0, upstream_max_ejection_time=5.0)
    assert error.option == "--upstream-ejection-time"


def test_listener_tls_flags(tmp_path: Path) -> None:
    assert error_of(build, tls_cert="c.pem").option == "--tls-cert"
    assert error_of(build, tls_client_ca="ca.pem").option == "--tls-client-ca"
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    assert error_of(build, tls_cert=str(bad), tls_key=str(bad)).option == "--tls-cert"
    assert build().tls is None


# The command line ---------------------------------------------------------------------------


def test_cli_network_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    served: list[ProxyConfig] = []
    monkeypatch.setattr(cli, "_serve", lambda config, **kw: served.append(config))
    monkeypatch.setattr(logs, "configure", lambda *a: None)
    pem = tmp_path / "ca.pem"
    pem.write_text("x")
    result = CliRunner().invoke(
        cli.main,
        [
            "--listen", ":8080",
            "--upstream", "127.0.0.1:1",
            "--upstream", "127.0.0.1:2,127.0.0.1:3",
            "--processor", "dns:///processors:9000",
            "--processor-ca", str(pem),
            "--processor-lb-policy", "pick_first",
            "--processor-keepalive-time", "30s",
            "--upstream-ejection-time", "5s",
            "--upstream-max-ejection-time", "60s",
            "--cluster", "other=unix:/run/p.sock",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (config,) = served
    assert [a.port for a in config.upstream.addresses] == [1, 2, 3]
    assert (config.upstream.ejection_time, config.upstream.max_ejection_time) == (5.0, 60.0)
    assert config.filter.processor.target == "dns:///processors:9000"
    assert config.filter.processor.credentials is not None
    args = dict(config.filter.processor.channel_args)
    assert args["grpc.keepalive_time_ms"] == 30000
    assert "pick_first" in str(args["grpc.service_config"])


def test_cli_refuses_a_bad_cluster_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "configure", lambda *a: None)
    result = CliRunner().invoke(
        cli.main,
        ["--listen", ":1", "--upstream", ":2", "--processor", "p:1", "--cluster", "x=nope"],
    )
    assert result.exit_code == cli.EXIT_CONFIG
    assert "--cluster" in result.output
