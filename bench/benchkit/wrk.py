"""Drive a target with wrk and read back exact numbers.

A Lua `done` hook prints the summary as JSON (latencies in µs), which is both more exact and
easier to read than the rounded, unit-suffixed --latency text. `done` runs once at the end, so
unlike a `response` hook it does not slow wrk's request loop.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

_MARK = "BENCH-JSON "
# Percentiles may be fractional, hence %.1f; LuaJIT's %d would truncate them anyway.
_SCRIPT = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH-JSON {"requests":%d,"duration_us":%d,"p50_us":%.1f,"p99_us":%.1f,'
    .. '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""
# wrk's own per-request timeout; a slower reply is a "timeout" error, not a latency sample.
REQUEST_TIMEOUT = "5s"
# Slack beyond --duration before we give up on wrk itself (connect storms, a stuck target).
_PROCESS_SLACK_S = 30.0


@dataclasses.dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    p50_us: float
    p99_us: float
    errors: dict[str, int]

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def write_script(
    workdir: Path, name: str = "report", method: str = "GET", body_bytes: int = 0
) -> Path:
    """The wrk script: the `done` hook, and the request to send when it is not a bare GET."""
    request = ""
    if method != "GET":
        request += f'wrk.method = "{method}"\n'
    if body_bytes:
        request += f'wrk.body = string.rep("x", {body_bytes})\n'
        request += 'wrk.headers["Content-Type"] = "application/octet-stream"\n'
    path = workdir / f"{name}.lua"
    path.write_text(request + _SCRIPT)
    return path


def run_wrk(
    port: int,
    *,
    duration_s: int,
    connections: int,
    threads: int,
    script: Path,
    path: str = "/",
) -> WrkResult:
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--timeout",
        REQUEST_TIMEOUT,
        "-s",
        str(script),
        f"http://127.0.0.1:{port}{path}",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=duration_s + _PROCESS_SLACK_S, check=False
    )
    return parse_output(done.stdout, done.stderr, done.returncode)


def parse_output(stdout: str, stderr: str, returncode: int) -> WrkResult:
    line = next((ln for ln in stdout.splitlines() if ln.startswith(_MARK)), None)
    if returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({returncode}):\n{stdout}\n{stderr}")
    data = json.loads(line[len(_MARK) :])
    return WrkResult(
        requests=int(data["requests"]),
        duration_s=data["duration_us"] / 1e6,
        p50_us=float(data["p50_us"]),
        p99_us=float(data["p99_us"]),
        errors={k: int(data[k]) for k in ("connect", "read", "write", "status", "timeout")},
    )
