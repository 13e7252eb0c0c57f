"""What the benchmark runs: nginx as the upstream, the processor, extproc and Envoy.

Each ``start_*`` returns a `Proc` that is listening; the caller owns stopping it.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchkit.procs import Proc, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO_ROOT / "bench"
EXTPROC_BIN = REPO_ROOT / "bin" / "extproc-proxy"
# Built by `make bench-tools` (bench/cpp_processor), gitignored.
CPP_PROCESSOR_BIN = BENCH_DIR / "build" / "cpp-processor"
APT_COMMAND = "apt-get update && apt-get install -y wrk nginx-light"
PROCESSORS = ("cpp", "python")

# The parity tests' bootstrap, so the benchmarked Envoy is the one extproc is compared with.
sys.path.insert(0, str(REPO_ROOT))
from tests.support.envoy import build_bootstrap, envoy_binary  # noqa: E402

BODY_BYTES = 1024
# The large response (`GET /64k`), served from a file nginx writes straight from the page cache.
LARGE_PATH = "/64k"
LARGE_BYTES = 64 * 1024


def nginx_binary() -> str | None:
    # Debian's nginx lives in /usr/sbin, which a non-root PATH often lacks.
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def envoy_available() -> bool:
    return envoy_binary() is not None


def missing_tools() -> list[str]:
    missing = [] if shutil.which("wrk") else ["wrk"]
    return missing + ([] if nginx_binary() else ["nginx"])


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # logs reach the file before a crash, for the error tail
    return env


def _nginx_user_line() -> str:
    # Only a root master switches users (to nobody by default); pin it to us instead.
    if os.geteuid() != 0:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};"


def nginx_config(workdir: Path, port: int) -> str:
    temp_paths = "\n".join(
        f"    {kind}_temp_path {workdir}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
{_nginx_user_line()}
worker_processes 1;
daemon off;
master_process on;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_timeout 75s;
    # The default (1000) closes each connection every 1000 requests: noise in a benchmark.
    keepalive_requests 100000000;
{temp_paths}
    server {{
        listen 127.0.0.1:{port};
        location = / {{
            default_type text/plain;
            return 200 "{"x" * BODY_BYTES}";
        }}
        location = {LARGE_PATH} {{
            default_type text/plain;
            alias {workdir}/large.txt;
        }}
    }}
}}
"""


def start_nginx(workdir: Path) -> Proc:
    binary = nginx_binary()
    assert binary is not None, "checked by missing_tools()"
    port = free_port()
    config = workdir / "nginx.conf"
    config.write_text(nginx_config(workdir, port))
    (workdir / "large.txt").write_bytes(b"x" * LARGE_BYTES)
    # -e: nginx opens its error log before reading the config; keep even that one in workdir.
    command = [binary, "-p", str(workdir), "-c", str(config), "-e", str(workdir / "nginx.err")]
    proc = Proc("nginx", command, port, workdir / "nginx.out", _child_env())
    proc.wait_listening()
    return proc


def _start_benchkit_module(
    workdir: Path, module: str, name: str, *args: str, cpus: frozenset[int] | None = None
) -> Proc:
    """`python -m benchkit.<module> PORT ARGS...`, importable from bench/, listening."""
    port = free_port()
    env = _child_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", f"benchkit.{module}", str(port), *args]
    proc = Proc(name, command, port, workdir / f"{name}.log", env, cpus)
    proc.wait_listening()
    return proc


def start_processor(workdir: Path, kind: str = "python") -> Proc:
    """The no-op processor: ``kind`` "python" (`benchkit.processor`) or "cpp" (built by
    `make bench-tools`)."""
    if kind == "python":
        return _start_benchkit_module(workdir, "processor", "processor")
    port = free_port()
    command = [str(CPP_PROCESSOR_BIN), str(port)]
    proc = Proc("cpp-processor", command, port, workdir / "cpp-processor.log", _child_env())
    proc.wait_listening()
    return proc


def start_h11_floor(
    workdir: Path,
    upstream: int,
    *,
    cpus: frozenset[int] | None = None,
    processor: int | None = None,
    response_headers: bool = False,
    name: str = "h11-floor",
) -> Proc:
    """The straightforward h11 proxy (`benchkit.h11_floor`) in front of ``upstream``; with a
    ``processor``, an ext_proc stream per request (request headers, and response headers
    when asked)."""
    args = [str(upstream)]
    if processor is not None:
        args += [str(processor), "both" if response_headers else "request"]
    return _start_benchkit_module(workdir, "h11_floor", name, *args, cpus=cpus)


def start_bulk_upstream(workdir: Path) -> Proc:
    """The large-body upstream of the memory benchmark (`benchkit.bulk_upstream`)."""
    return _start_benchkit_module(workdir, "bulk_upstream", "bulk-upstream")


def start_extproc(
    workdir: Path,
    upstream: int,
    processor: int,
    *,
    mode: dict[str, str],
    extra_args: Sequence[str] = (),
    name: str = "extproc",
    cpus: frozenset[int] | None = None,
) -> Proc:
    """extproc with the filter config Envoy gets (`processing_mode` = ``mode``) as `--config`;
    `extra_args` adds flags (a variant's, e.g. `--grpc-client stub`); `cpus` pins it."""
    port = free_port()
    config = workdir / f"{name}-filter.json"
    config.write_text(json.dumps({"processing_mode": mode}))
    command = [
        str(EXTPROC_BIN),
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"127.0.0.1:{upstream}",
        "--processor",
        f"127.0.0.1:{processor}",
        "--config",
        str(config),
        "--log-level",
        "warning",
        # Envoy's HCM leaves X-Forwarded-For alone unless use_remote_address; match it.
        "--no-xff",
        *extra_args,
    ]
    proc = Proc(name, command, port, workdir / f"{name}.log", _child_env(), cpus)
    proc.wait_listening()
    return proc


def envoy_bootstrap(
    port: int, upstream: int, processor: int, *, mode: dict[str, str]
) -> dict[str, Any]:
    bootstrap = build_bootstrap(
        upstream=("127.0.0.1", upstream),
        processor=("127.0.0.1", processor),
        ext_proc={"processing_mode": mode},
    )
    # build_bootstrap asks for port 0; a fixed port spares us the admin-API lookup.
    listener = bootstrap["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = port
    return bootstrap


def start_envoy(
    workdir: Path,
    upstream: int,
    processor: int,
    *,
    mode: dict[str, str],
    name: str = "envoy",
    cpus: frozenset[int] | None = None,
) -> Proc:
    binary = envoy_binary()
    if binary is None:
        raise RuntimeError("no runnable Envoy: set EXTPROC_ENVOY_BIN or run `make envoy`")
    port = free_port()
    config = workdir / f"{name}.json"
    config.write_text(json.dumps(envoy_bootstrap(port, upstream, processor, mode=mode)))
    command = [
        binary,
        "--config-path",
        str(config),
        "--concurrency",
        "1",
        "--log-level",
        "warn",
        "--disable-hot-restart",
        "--use-dynamic-base-id",
    ]
    proc = Proc(name, command, port, workdir / f"{name}.log", _child_env(), cpus)
    proc.wait_listening()
    return proc


def tool_versions() -> dict[str, str]:
    """One line per tool, for the report header (best effort)."""
    versions: dict[str, str] = {}
    probes = {
        "wrk": ["wrk", "--version"],
        "nginx": [nginx_binary() or "nginx", "-v"],
        "envoy": [envoy_binary() or "envoy", "--version"],
    }
    for tool, command in probes.items():
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            versions[tool] = "?"
            continue
        lines = (done.stdout + done.stderr).strip().splitlines()
        # Envoy prefixes its own path; keep what follows "version:" when there is one.
        first = lines[0].split("version:", 1)[-1].strip() if lines else "?"
        versions[tool] = first
    return versions
