"""Run a real Envoy 1.40 with the ext_proc filter in front of a test upstream.

Parity tests send the same scenario through Envoy and through extproc and compare what the
client, the upstream and the processor see. This module owns the Envoy side: finding the
binary, writing a bootstrap, starting Envoy on loopback with free ports and stopping it.
"""

from __future__ import annotations

import copy
import functools
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_ENVOY = REPO_ROOT / ".venv-envoy/lib/python3.11/site-packages/envoy/_bin/envoy"

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 40

EXT_PROC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
HCM_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_OPTIONS_TYPE = "type.googleapis.com/" + HTTP_OPTIONS_KEY


@functools.cache
def _runs(path: str) -> bool:
    """True when `path --version` exits 0 (checked once per path)."""
    try:
        done = subprocess.run(
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _executable(path: str | None) -> bool:
    return bool(path) and os.path.isfile(str(path)) and os.access(str(path), os.X_OK)


def envoy_binary() -> str | None:
    """The Envoy to test against, or None when none runs here.

    Looks at $EXTPROC_ENVOY_BIN, then the repo's .venv-envoy, then PATH.
    """
    candidates = [os.environ.get("EXTPROC_ENVOY_BIN"), str(VENV_ENVOY), shutil.which("envoy")]
    for candidate in candidates:
        if candidate and _executable(candidate) and _runs(candidate):
            return candidate
    return None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: dicts merge key by key, anything else in `extra` replaces."""
    merged = dict(base)
    for key, value in extra.items():
        old = merged.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            merged[key] = _merge(old, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _static_cluster(name: str, address: tuple[str, int], options: dict[str, Any]) -> dict[str, Any]:
    host, port = address
    endpoint = {"address": {"socket_address": {"address": host, "port_value": port}}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
        },
        "typed_extension_protocol_options": {
            HTTP_OPTIONS_KEY: {"@type": HTTP_OPTIONS_TYPE, "explicit_http_config": options},
        },
    }


def build_bootstrap(
    *,
    upstream: tuple[str, int],
    processor: tuple[str, int],
    ext_proc: dict[str, Any] | None = None,
    hcm: dict[str, Any] | None = None,
    trailers: bool = False,
    buffer_limit_bytes: int | None = None,
) -> dict[str, Any]:
    """The bootstrap: one HTTP/1.1 listener, ext_proc then router, two static clusters.

    ``trailers`` makes Envoy's HTTP/1 codec keep trailers, which it drops by default: it sets
    ``http_protocol_options.enable_trailers`` on the HCM (downstream) and on the upstream
    cluster. ``buffer_limit_bytes`` sets the listener's ``per_connection_buffer_limit_bytes``
    (default 1 MiB), which is also each HTTP stream's buffer limit in both directions: the limit
    that BUFFERED body processing enforces (413 / 500).
    """
    http1_options: dict[str, Any] = {"enable_trailers": True} if trailers else {}
    filter_config = copy.deepcopy(ext_proc or {})
    if not any(k in filter_config for k in ("grpc_service", "grpcService", "http_service")):
        filter_config["grpc_service"] = {"envoy_grpc": {"cluster_name": "ext_proc"}}
    filter_config["@type"] = EXT_PROC_TYPE
    manager: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": "ingress",
        "codec_type": "HTTP1",
        "route_config": {
            "name": "local",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                }
            ],
        },
        "http_filters": [
            {"name": "envoy.filters.http.ext_proc", "typed_config": filter_config},
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}},
        ],
    }
    if trailers:
        manager["http_protocol_options"] = dict(http1_options)
    manager = _merge(manager, hcm or {})
    listener: dict[str, Any] = {
        "name": "ingress",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }
    if buffer_limit_bytes is not None:
        listener["per_connection_buffer_limit_bytes"] = buffer_limit_bytes
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [listener],
            "clusters": [
                _static_cluster("upstream", upstream, {"http_protocol_options": http1_options}),
                _static_cluster("ext_proc", processor, {"http2_protocol_options": {}}),
            ],
        },
    }


class EnvoyError(RuntimeError):
    """Envoy did not start (or is not there)."""


class EnvoyProxy:
    """A real Envoy on 127.0.0.1: `with EnvoyProxy(...) as envoy:` then talk to envoy.port."""

    def __init__(
        self,
        *,
        upstream: tuple[str, int],
        processor: tuple[str, int],
        ext_proc: dict[str, Any] | None = None,
        workdir: Path,
        concurrency: int = 1,
        hcm: dict[str, Any] | None = None,
        trailers: bool = False,
        buffer_limit_bytes: int | None = None,
        log_level: str = "warn",
    ) -> None:
        """``trailers`` and ``buffer_limit_bytes``: see build_bootstrap. ``log_level`` is
        Envoy's --log-level (e.g. "debug" to read what the filter did in envoy.log)."""
        self.workdir = Path(workdir)
        self.log_level = log_level
        self.concurrency = concurrency
        self.bootstrap = build_bootstrap(
            upstream=upstream,
            processor=processor,
            ext_proc=ext_proc,
            hcm=hcm,
            trailers=trailers,
            buffer_limit_bytes=buffer_limit_bytes,
        )
        self.config_path = self.workdir / "envoy.json"
        self.log_path = self.workdir / "envoy.log"
        self.admin_address_path = self.workdir / "envoy.admin"
        self.port = 0
        self.admin_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Self:
        binary = envoy_binary()
        if binary is None:
            raise EnvoyError("no runnable Envoy: set EXTPROC_ENVOY_BIN or run `make envoy`")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.bootstrap, indent=2))
        self.admin_address_path.unlink(missing_ok=True)
        command = [
            binary,
            "--config-path",
            str(self.config_path),
            "--concurrency",
            str(self.concurrency),
            "--log-level",
            self.log_level,
            "--disable-hot-restart",
            "--use-dynamic-base-id",
            "--admin-address-path",
            str(self.admin_address_path),
        ]
        self._log = self.log_path.open("wb")
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        try:
            self._wait_ready(time.monotonic() + START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM, up to 10 s, then SIGKILL. Idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- readiness -------------------------------------------------------------------------

    def _wait_ready(self, deadline: float) -> None:
        while True:
            problem = self._probe()
            if problem is None:
                return
            assert self._process is not None
            code = self._process.poll()
            if code is not None:
                raise EnvoyError(f"Envoy exited with {code} while starting\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise EnvoyError(
                    f"Envoy not ready after {START_TIMEOUT_S:.0f} s ({problem})\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _probe(self) -> str | None:
        """None when ready, else what is still missing."""
        if not self.admin_port:
            try:
                text = self.admin_address_path.read_text().strip()
            except FileNotFoundError:
                return "no admin address yet"
            if not text:
                return "no admin address yet"
            self.admin_port = int(text.rsplit(":", 1)[1])
        try:
            status, body = self._admin_get("/ready")
            if status != 200 or body.strip() != b"LIVE":
                return f"/ready answered {status} {body.strip()!r}"
            if not self.port:
                self.port = self._listener_port()
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                pass
        except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as error:
            return f"{type(error).__name__}: {error}"
        return None

    def _listener_port(self) -> int:
        status, body = self._admin_get("/listeners?format=json")
        if status != 200:
            raise ValueError(f"/listeners answered {status}")
        listeners = json.loads(body)["listener_statuses"]
        port = int(listeners[0]["local_address"]["socket_address"]["port_value"])
        if port == 0:
            raise ValueError("listener has no port yet")
        return port

    def _admin_get(self, path: str) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    # -- inspection ------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def stats(self) -> dict[str, int]:
        """Counters (name -> value), e.g. "http.ingress.ext_proc.streams_started"."""
        status, body = self._admin_get("/stats?format=json&type=Counters")
        if status != 200:
            raise EnvoyError(f"/stats answered {status}: {body[:200]!r}")
        counters: dict[str, int] = {}
        for entry in json.loads(body).get("stats", []):
            if "name" in entry and isinstance(entry.get("value"), int):
                counters[entry["name"]] = entry["value"]
        return counters

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no envoy.log)"
        tail = text.splitlines()[-lines:]
        return "--- envoy.log (tail) ---\n" + "\n".join(tail)


def require_envoy() -> None:
    """Skip a parity test where no Envoy runs here; in CI (``CI`` set) fail instead."""
    if envoy_binary() is None:
        message = "no runnable Envoy 1.40 (set EXTPROC_ENVOY_BIN or run `make envoy`)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
