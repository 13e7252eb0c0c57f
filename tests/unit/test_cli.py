"""The command line parses and forwards; it starts no server here (the run is patched)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from extproc import cli, logs
from extproc.addresses import Address
from extproc.config import ProxyConfig

Served = list[ProxyConfig]


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Served:
    calls: Served = []

    def fake_serve(config: ProxyConfig, announce: Any = None, **kw: Any) -> None:
        calls.append(config)

    monkeypatch.setattr(cli, "_serve", fake_serve)
    monkeypatch.setattr(logs, "configure", lambda *a: None)
    return calls


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli.main, list(args))


def test_run_is_the_default_command(served: Served) -> None:
    result = invoke(
        "--listen",
        ":8080",
        "--upstream",
        "127.0.0.1:80",
        "--processor",
        "127.0.0.1:9000",
        "--failure-mode-allow",
        "--message-timeout",
        "350ms",
        "--request-header-mode",
        "skip",
        "--threads",
        "4",
        "--no-xff",
    )
    assert result.exit_code == 0, result.output
    (config,) = served
    assert config.listen == Address("0.0.0.0", 8080)
    assert config.threads == 4 and not config.forwarded_for
    assert config.filter.exchange.failure_mode_allow
    assert config.filter.exchange.message_timeout == 0.35
    mode = config.filter.exchange.processing_mode
    assert mode.request_header_mode == mode.SKIP


def test_config_file_and_cluster_flag(served: Served, tmp_path: Path) -> None:
    path = tmp_path / "filter.yaml"
    path.write_text("grpc_service:\n  envoy_grpc:\n    cluster_name: proc\n")
    result = invoke(
        "--listen",
        ":1",
        "--upstream",
        "127.0.0.1:2",
        "--config",
        str(path),
        "--cluster",
        "proc=127.0.0.1:9001",
    )
    assert result.exit_code == 0, result.output
    assert served[0].filter.processor.target == "127.0.0.1:9001"


def test_config_errors_exit_2_naming_the_field(served: Served, tmp_path: Path) -> None:
    path = tmp_path / "filter.yaml"
    path.write_text("processing_mode:\n  request_body_mode: GRPC\n")
    result = invoke(
        "--listen", ":1", "--upstream", "127.0.0.1:2", "--processor", "h:1", "--config", str(path)
    )
    assert result.exit_code == cli.EXIT_CONFIG
    assert "ext_proc.processing_mode.request_body_mode" in result.output
    assert not served


def test_missing_upstream_exits_2(served: Served) -> None:
    result = invoke("--listen", ":1", "--processor", "h:1")
    assert result.exit_code == cli.EXIT_CONFIG and "--upstream" in result.output


def test_bad_cluster_flag_exits_2(served: Served) -> None:
    result = invoke("--listen", ":1", "--upstream", "h:2", "--cluster", "nohost")
    assert result.exit_code == cli.EXIT_CONFIG and "--cluster" in result.output


def test_bad_duration_is_a_usage_error(served: Served) -> None:
    result = invoke(
        "--listen", ":1", "--upstream", "h:2", "--processor", "h:1", "--idle-timeout", "forever"
    )
    assert result.exit_code == 2 and "--idle-timeout" in result.output


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and "extproc-proxy" in result.output


def test_admin_flag_and_stat_prefix(served: Served, tmp_path: Path) -> None:
    path = tmp_path / "filter.yaml"
    path.write_text("grpc_service: {google_grpc: {target_uri: 'h:1'}}\nstat_prefix: edge\n")
    base = ("--listen", ":1", "--upstream", "127.0.0.1:2", "--config", str(path))
    assert invoke(*base).exit_code == 0
    assert invoke(*base, "--admin", "127.0.0.1:9901").exit_code == 0
    without, with_admin = served
    assert without.admin is None and without.filter.stat_prefix == "edge"
    assert with_admin.admin == Address("127.0.0.1", 9901)


def test_bad_admin_address_exits_2(served: Served) -> None:
    result = invoke("--listen", ":1", "--upstream", "h:2", "--processor", "h:1", "--admin", "x")
    assert result.exit_code == cli.EXIT_CONFIG and "--admin" in result.output


def test_metadata_header_flag(served: Served) -> None:
    result = invoke(
        "--listen",
        ":1",
        "--upstream",
        "127.0.0.1:2",
        "--processor",
        "h:1",
        "--metadata-header",
        "ns=X-Ext-Proc-DM",
    )
    assert result.exit_code == 0, result.output
    assert served[0].filter.exchange.metadata_headers == (("ns", b"x-ext-proc-dm"),)
    bad = invoke(
        "--listen",
        ":1",
        "--upstream",
        "127.0.0.1:2",
        "--processor",
        "h:1",
        "--metadata-header",
        "ns=bad name",
    )
    assert bad.exit_code == cli.EXIT_CONFIG and "--metadata-header" in bad.output


def test_max_connections_flag(served: Served) -> None:
    base = ("--listen", ":1", "--upstream", "127.0.0.1:2", "--processor", "h:1")
    assert invoke(*base).exit_code == 0
    assert invoke(*base, "--max-connections", "500").exit_code == 0
    assert [c.max_connections for c in served] == [0, 500]
    refused = invoke(*base, "--max-connections", "-1")
    assert refused.exit_code == 2 and "--max-connections" in refused.output


def test_grpc_client_flag(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXTPROC_GRPC_CLIENT", raising=False)
    base = ("--listen", ":1", "--upstream", "127.0.0.1:2", "--processor", "h:1")
    assert invoke(*base).exit_code == 0
    assert invoke(*base, "--grpc-client", "stub").exit_code == 0
    assert [c.filter.processor.grpc_client for c in served] == ["direct", "stub"]
    refused = invoke(*base, "--grpc-client", "aio")
    assert refused.exit_code == 2 and "--grpc-client" in refused.output
