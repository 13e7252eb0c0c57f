"""Options declared once (extproc.options): flag, environment, file and default, in that
order; each bad value named by its place; --help and docs/configuration.md from the table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from extproc import cli, logs
from extproc.addresses import Address
from extproc.config import ProxyConfig, build_config, parse_file_data
from extproc.errors import ConfigError
from extproc.options import SPECS, Options, env_name, flag_name, markdown_table

DOC = Path(__file__).parents[2] / "docs" / "configuration.md"
BASE = {"listen": ":8080", "upstream": "127.0.0.1:8000", "processor": "127.0.0.1:9000"}
FILE = {"ext_proc": {"message_timeout": "3s"}, "threads": 3, "grpc_client": "stub"}


def built(given: dict[str, Any], environ: dict[str, str], file: Any = FILE) -> ProxyConfig:
    return build_config(parse_file_data(file) if file is not None else None, given, environ)


def test_each_place_wins_over_the_next() -> None:
    """Flag over environment over file over default, for an option of the proxy (threads),
    one of the filter (grpc_client), and a field of the filter message (message_timeout)."""
    default = built(BASE, {}, None)
    assert default.threads == 32
    assert default.filter.processor.grpc_client == "direct"
    assert default.filter.exchange.message_timeout == 0.2
    file = built(BASE, {})
    assert file.threads == 3
    assert file.filter.processor.grpc_client == "stub"
    assert file.filter.exchange.message_timeout == 3.0
    env = {"EXTPROC_THREADS": "4", "EXTPROC_GRPC_CLIENT": "direct", "EXTPROC_MESSAGE_TIMEOUT": "4s"}
    from_env = built(BASE, env)
    assert from_env.threads == 4
    assert from_env.filter.processor.grpc_client == "direct"
    assert from_env.filter.exchange.message_timeout == 4.0
    flags = {**BASE, "threads": "5", "grpc_client": "stub", "message_timeout": "5s"}
    from_flags = built(flags, env)
    assert from_flags.threads == 5
    assert from_flags.filter.processor.grpc_client == "stub"
    assert from_flags.filter.exchange.message_timeout == 5.0


def test_every_option_is_read_from_its_environment_variable() -> None:
    """Each option of the table, given only in the environment, reaches the configuration."""
    env = {
        "EXTPROC_LISTEN": "127.0.0.1:8081",
        "EXTPROC_UPSTREAM": "127.0.0.1:1, 127.0.0.1:2",
        "EXTPROC_PROCESSOR": "127.0.0.1:9001",
        "EXTPROC_XFF": "false",
        "EXTPROC_HONOR_APPEND_ACTION": "yes",
        "EXTPROC_REQUEST_BODY_MODE": "STREAMED",
        "EXTPROC_UPSTREAM_TIMEOUT": "250ms",
        "EXTPROC_ADMIN": "127.0.0.1:9901",
        "EXTPROC_METADATA_HEADER": "a=x-a,b=x-b",
    }
    config = built({}, env, None)
    assert config.listen == Address("127.0.0.1", 8081)
    assert config.upstream.addresses == (Address("127.0.0.1", 1), Address("127.0.0.1", 2))
    assert config.filter.processor.target == "127.0.0.1:9001"
    assert not config.forwarded_for
    assert config.filter.exchange.honor_append_action
    mode = config.filter.exchange.processing_mode
    assert mode.request_body_mode == mode.STREAMED
    assert config.timeouts.upstream == 0.25
    assert config.admin == Address("127.0.0.1", 9901)
    assert config.filter.exchange.metadata_headers == (("a", b"x-a"), ("b", b"x-b"))


def test_an_empty_variable_is_not_set() -> None:
    """systemd's ``EXTPROC_ADMIN=`` (an EnvironmentFile line left empty) leaves the default."""
    assert built(BASE, {"EXTPROC_ADMIN": "", "EXTPROC_THREADS": ""}, None).admin is None


def test_clusters_merge_across_places_the_higher_winning_a_name() -> None:
    file = {
        "ext_proc": {"grpc_service": {"envoy_grpc": {"cluster_name": "a"}}},
        "clusters": {"a": "127.0.0.1:1", "b": "127.0.0.1:2"},
    }
    given = {"listen": ":1", "upstream": "127.0.0.1:2"}
    assert built(given, {}, file).filter.processor.target == "127.0.0.1:1"
    from_env = built(given, {"EXTPROC_CLUSTER": "a=127.0.0.1:3"}, file)
    assert from_env.filter.processor.target == "127.0.0.1:3"
    flagged = built({**given, "cluster": ("a=127.0.0.1:4",)}, {"EXTPROC_CLUSTER": "a=h:3"}, file)
    assert flagged.filter.processor.target == "127.0.0.1:4"


@pytest.mark.parametrize(
    ("place", "name"),
    [("flag", "--threads"), ("env", "EXTPROC_THREADS"), ("file", "threads")],
)
def test_a_bad_value_is_named_by_its_place(place: str, name: str) -> None:
    given = {**BASE, "threads": "many"} if place == "flag" else BASE
    environ = {"EXTPROC_THREADS": "many"} if place == "env" else {}
    file = {"ext_proc": {}, "threads": "many"} if place == "file" else None
    with pytest.raises(ConfigError) as info:
        built(given, environ, file)
    assert info.value.option == name
    assert "expected a whole number from 1 to 4096, got 'many'" in info.value.message


@pytest.mark.parametrize(
    ("variable", "value", "detail"),
    [
        ("EXTPROC_XFF", "perhaps", "expected true or false"),
        ("EXTPROC_MESSAGE_TIMEOUT", "soon", "expected a duration"),
        ("EXTPROC_UPSTREAM", "127.0.0.1:1,", "an empty item"),
        ("EXTPROC_REQUEST_BODY_MODE", "grpc", "is not one of none, streamed"),
        ("EXTPROC_CLUSTER", "nameless", "expected NAME=TARGET"),
        ("EXTPROC_TLS_CERT", "/nonexistent/cert.pem", "is not a file"),
    ],
)
def test_bad_environment_values_are_refused(variable: str, value: str, detail: str) -> None:
    with pytest.raises(ConfigError) as info:
        built(BASE, {variable: value}, None)
    assert info.value.option == variable
    assert detail in info.value.message


def test_an_unknown_keyword_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        built({**BASE, "thread": 4}, {}, None)
    assert str(info.value) == "--thread: is not an option of extproc"


def test_the_command_line_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[ProxyConfig] = []
    monkeypatch.setattr(cli, "_serve", lambda config, *a, **kw: served.append(config))
    monkeypatch.setattr(logs, "configure", lambda *a: None)
    env = {
        "EXTPROC_UPSTREAM": "127.0.0.1:7",
        "EXTPROC_PROCESSOR": "127.0.0.1:9",
        "EXTPROC_THREADS": "6",
    }
    result = CliRunner().invoke(cli.main, ["--listen", ":1", "--threads", "7"], env=env)
    assert result.exit_code == 0, result.output
    (config,) = served
    assert config.upstream.addresses == (Address("127.0.0.1", 7),)
    assert config.threads == 7  # the flag over EXTPROC_THREADS
    bad = CliRunner().invoke(cli.main, ["--listen", ":1"], env={**env, "EXTPROC_WORKERS": "0"})
    assert bad.exit_code == cli.EXIT_CONFIG
    assert "EXTPROC_WORKERS: expected a whole number from 1 to 256, got '0'" in bad.output


@pytest.mark.parametrize("command", ["run", "demo"])
def test_help_shows_every_option_with_its_variable(command: str) -> None:
    result = CliRunner().invoke(cli.main, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for name, spec in SPECS.items():
        if command == "demo" and not spec.demo:
            assert flag_name(name) + " " not in text
            continue
        assert flag_name(name) in text
        assert f"env: {env_name(name)}]" in text


def test_the_configuration_doc_has_the_table_as_generated() -> None:
    """docs/configuration.md holds markdown_table() between its markers: `make docs` writes
    it, so the doc cannot drift from the options."""
    doc = DOC.read_text()
    match = re.search(r"<!-- options:begin -->\n(.*?)<!-- options:end -->", doc, re.S)
    assert match, "docs/configuration.md lost its option table markers"
    assert match[1] == markdown_table(), "run `make docs` to regenerate the option table"


def test_the_systemd_environment_file_holds_only_options() -> None:
    """examples/systemd/extproc.env: every line names an option and has a good value."""
    path = Path(__file__).parents[2] / "examples" / "systemd" / "extproc.env"
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    environ = dict(line.split("=", 1) for line in lines)
    known = {env_name(name) for name in SPECS}
    assert set(environ) <= known, set(environ) - known
    options = Options.resolve({}, {}, environ)
    assert options.upstream == (Address("127.0.0.1", 8000),)
    assert (options.workers, options.cpu_affinity) == (2, True)
    service = path.with_name("extproc.service").read_text()
    assert "EnvironmentFile=/etc/extproc/extproc.env" in service
