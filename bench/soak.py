"""Soak extproc: sustained concurrent load with random bodies through a body-transforming processor.

    .venv/bin/python bench/soak.py [--duration 180] [--connections 32] [--max-body 256KiB]
                                   [--mode streamed|buffered] [--json FILE]

Starts, each in its own process on 127.0.0.1, an upstream that checks and echoes request
bodies (`benchkit.echo_upstream`), the XOR processor (`benchkit.xor_processor`, through the
SDK's extproc-processor) and extproc with both body modes set to --mode. Then --connections
keep-alive clients POST random bodies of random sizes (log-uniform up to --max-body, half
with a Content-Length, half chunked) for --duration seconds. The processor XORs each body on
the way up and again on the way down: the upstream checks the SHA-256 of what it got against
the client's header (422 otherwise) and echoes it, and the client compares the reply with
what it sent. Every request is counted: ok, lost (no reply, an error or a status other than
200) or corrupted (a reply that differs).

The proxy's resident memory, open descriptors and threads are read from /proc after a
warm-up at full concurrency, and again at the end, each time with every client connection
closed and the proxy idle (its upstream keep-alive pool is counted apart). Exits 1 when a
request was lost or corrupted, a descriptor or thread leaked, or memory grew by more than
--max-rss-growth.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import http.client
import json
import math
import os
import random
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchkit.memstat import RssSampler
from benchkit.procs import Proc, free_port, http_get, rss_bytes
from benchkit.report import load_average, machine_lines
from benchkit.xor_processor import xor

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_ROOT / "bench"
EXIT_FAILED = 1
MIB = 1 << 20
# Envoy's 200 ms default is too short for Python processors on a shared 2-core machine: a late
# reply would be a 504 that says nothing about losing or corrupting bodies.
MESSAGE_TIMEOUT = "5s"
SETTLE_TIMEOUT_S = 30.0
# Readings taken while the proxy is idle still catch a thread that is just finishing.
SETTLE_QUIET_S = 1.0
ERRORS_KEPT = 10


# Arguments ------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*(b|kib|mib)?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 256KiB, 1MiB, 1000)")
    return int(match.group(1)) * {"": 1, "b": 1, "kib": 1024, "mib": MIB}[match.group(2) or ""]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load (180)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring (5)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent clients (32)")
    parser.add_argument("--threads", type=int, default=32, help="extproc worker threads (32)")
    parser.add_argument("--max-body", type=parse_size, default=256 * 1024, help="(256KiB)")
    parser.add_argument("--mode", choices=["streamed", "buffered"], default="streamed")
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request")
    parser.add_argument("--max-rss-growth", type=parse_size, default=16 * MIB, help="(16MiB)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (time by default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.duration <= 0 or args.max_body < 0:
        parser.error("--connections and --duration must be positive")
    if args.seed is None:
        args.seed = time.time_ns() % 2**32
    return args


# The system under test --------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    path = [str(BENCH_DIR), str(REPO_ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    return env


@dataclasses.dataclass
class System:
    upstream: Proc
    processor: Proc
    proxy: Proc
    admin_port: int


@contextlib.contextmanager
def running_system(args: argparse.Namespace, workdir: Path) -> Iterator[System]:
    started: list[Proc] = []

    def start(name: str, command: list[str], port: int) -> Proc:
        proc = Proc(name, command, port, workdir / f"{name}.log", _env())
        started.append(proc)
        proc.wait_listening()
        return proc

    try:
        port = free_port()
        upstream = start(
            "upstream", [sys.executable, "-m", "benchkit.echo_upstream", str(port)], port
        )
        port = free_port()
        processor = start(
            "processor",
            [
                sys.executable,
                "-m",
                "extproc.processor.cli",
                "benchkit.xor_processor:XorProcessor",
                "--listen",
                f"127.0.0.1:{port}",
                "--workers",
                str(4 * args.connections),
            ],
            port,
        )
        port, admin = free_port(), free_port()
        proxy = start(
            "extproc",
            [
                sys.executable,
                "-m",
                "extproc",
                "--listen",
                f"127.0.0.1:{port}",
                "--upstream",
                f"127.0.0.1:{upstream.port}",
                "--processor",
                f"127.0.0.1:{processor.port}",
                "--request-body-mode",
                args.mode,
                "--response-body-mode",
                args.mode,
                "--threads",
                str(args.threads),
                "--message-timeout",
                MESSAGE_TIMEOUT,
                "--admin",
                f"127.0.0.1:{admin}",
                "--log-level",
                "warning",
            ],
            port,
        )
        yield System(upstream, processor, proxy, admin)
    finally:
        for proc in reversed(started):
            proc.stop()


# Load -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Tally:
    ok: int = 0
    lost: int = 0
    corrupted: int = 0
    bytes: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def requests(self) -> int:
        return self.ok + self.lost + self.corrupted

    def add(self, outcome: str, size: int, error: str | None = None) -> None:
        with self.lock:
            setattr(self, outcome, getattr(self, outcome) + 1)
            self.bytes += size
            if error is not None and len(self.errors) < ERRORS_KEPT:
                self.errors.append(error)


def body_size(rng: random.Random, largest: int) -> int:
    """Log-uniform in [0, largest]: as many tiny bodies as large ones."""
    return int(math.exp(rng.uniform(0, math.log(largest + 1)))) - 1


def pieces(body: bytes, rng: random.Random) -> Iterator[bytes]:
    start = 0
    while start < len(body):
        end = start + rng.randint(1, max(1, len(body) // 3))
        yield body[start:end]
        start = end


def one_request(
    conn: http.client.HTTPConnection, rng: random.Random, largest: int, number: int
) -> tuple[str, int, str | None]:
    body = rng.randbytes(body_size(rng, largest))
    headers = {
        "x-soak-sha256": hashlib.sha256(xor(body)).hexdigest(),
        "x-soak-request": str(number),
    }
    if rng.random() < 0.5:
        conn.request("POST", "/soak", body=body, headers=headers)
    else:
        conn.request("POST", "/soak", body=pieces(body, rng), headers=headers, encode_chunked=True)
    response = conn.getresponse()
    data = response.read()
    if response.status == 422:
        return "corrupted", len(body), f"#{number}: upstream got a different body"
    if response.status != 200:
        return "lost", len(body), f"#{number}: status {response.status} {data[:200]!r}"
    if data != body:
        return "corrupted", len(body), f"#{number}: {len(data)} bytes back for {len(body)}"
    return "ok", len(body), None


def client(
    address: tuple[str, int], args: argparse.Namespace, seed: int, until: float, tally: Tally
) -> None:
    rng = random.Random(seed)
    conn = http.client.HTTPConnection(*address, timeout=args.timeout)
    number = 0
    try:
        while time.monotonic() < until:
            number += 1
            try:
                outcome, size, error = one_request(conn, rng, args.max_body, number)
            except (OSError, http.client.HTTPException) as err:
                outcome, size, error = "lost", 0, f"#{number}: {type(err).__name__}: {err}"
                conn.close()
                conn = http.client.HTTPConnection(*address, timeout=args.timeout)
            tally.add(outcome, size, error)
    finally:
        conn.close()


def load(address: tuple[str, int], args: argparse.Namespace, seconds: float, seed: int) -> Tally:
    tally = Tally()
    until = time.monotonic() + seconds
    threads = [
        threading.Thread(target=client, args=(address, args, seed + i, until, tally), daemon=True)
        for i in range(args.connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + args.timeout * 2)
        if thread.is_alive():
            tally.add("lost", 0, "a client thread never finished")
    return tally


# Readings ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reading:
    rss: int
    fds: int
    pooled: int  # of the fds: idle keep-alive connections to the upstream
    threads: int


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def pooled_connections(pid: int, upstream_port: int) -> int:
    """The process's TCP sockets connected to the upstream's port (from /proc/PID/net/tcp)."""
    inodes = _socket_inodes(pid)
    count = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        if remote_port == upstream_port and fields[9] in inodes:
            count += 1
    return count


def read_process(pid: int, upstream_port: int) -> Reading:
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    return Reading(
        rss=rss_bytes(pid),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        pooled=pooled_connections(pid, upstream_port),
        threads=threads,
    )


def settled_reading(system: System) -> Reading:
    """A reading once every client connection is closed on the proxy's side and nothing moved
    for a moment (threads finishing, descriptors being closed)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        _, text = http_get(system.admin_port, "/stats?filter=downstream_cx_active")
        if text.strip().endswith(b" 0"):
            break
        time.sleep(0.1)
    last = read_process(system.proxy.pid, system.upstream.port)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < SETTLE_QUIET_S:
        time.sleep(0.1)
        current = read_process(system.proxy.pid, system.upstream.port)
        if (current.fds, current.threads) != (last.fds, last.threads):
            quiet_since = time.monotonic()
        last = current
    return last


# Report -----------------------------------------------------------------------------------


def rss_profile(samples: list[tuple[float, int]], began: float, seconds: float) -> list[float]:
    """The proxy's RSS under load at each tenth of the run (MiB): a leak climbs steadily, an
    allocator settling in rises early and levels off."""
    marks = []
    for tenth in range(11):
        at = began + seconds * tenth / 10
        nearest = min(samples, key=lambda sample: abs(sample[0] - at))
        marks.append(round(nearest[1] / MIB, 1))
    return marks


def judge(args: argparse.Namespace, tally: Tally, start: Reading, end: Reading) -> list[str]:
    problems = []
    if tally.lost or tally.corrupted:
        problems.append(f"{tally.lost} lost and {tally.corrupted} corrupted requests")
    if tally.requests == 0:
        problems.append("no request completed")
    if end.fds - end.pooled > start.fds - start.pooled:
        problems.append(f"descriptors leaked: {start.fds} at the start, {end.fds} at the end")
    if end.threads > start.threads:
        problems.append(f"threads leaked: {start.threads} at the start, {end.threads} at the end")
    if end.rss - start.rss > args.max_rss_growth:
        problems.append(f"RSS grew by {(end.rss - start.rss) / MIB:.1f} MiB")
    return problems


def report(
    args: argparse.Namespace, tally: Tally, start: Reading, end: Reading, seconds: float
) -> dict[str, Any]:
    return {
        "mode": args.mode,
        "connections": args.connections,
        "threads": args.threads,
        "seconds": round(seconds, 1),
        "max_body": args.max_body,
        "seed": args.seed,
        "requests": tally.requests,
        "ok": tally.ok,
        "lost": tally.lost,
        "corrupted": tally.corrupted,
        "body_mib_each_way": round(tally.bytes / MIB, 1),
        "requests_per_s": round(tally.requests / seconds, 1),
        "rss_mib": [round(start.rss / MIB, 1), round(end.rss / MIB, 1)],
        "fds": [start.fds, end.fds],
        "pooled_upstream_fds": [start.pooled, end.pooled],
        "threads_proxy": [start.threads, end.threads],
        "load_average_end": load_average(),
        "errors": tally.errors,
    }


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="extproc-soak-") as tmp:
        workdir = Path(tmp)
        try:
            with running_system(args, workdir) as system:
                address = ("127.0.0.1", system.proxy.port)
                warm = load(address, args, args.warmup, args.seed)
                start = settled_reading(system)
                began = time.monotonic()
                with RssSampler(system.proxy.pid, interval=1.0) as sampler:
                    tally = load(address, args, args.duration, args.seed + args.connections)
                seconds = time.monotonic() - began
                end = settled_reading(system)
                tally.lost += warm.lost
                tally.corrupted += warm.corrupted
                tally.errors = warm.errors + tally.errors
                figures = report(args, tally, start, end, seconds)
                figures["rss_mib_during"] = rss_profile(sampler.samples, began, seconds)
                problems = judge(args, tally, start, end)
                if problems:
                    print(system.proxy.tail(), file=sys.stderr)
        except Exception as err:  # noqa: BLE001 - a harness failure is reported, exit 1
            print(f"soak: {type(err).__name__}: {err}", file=sys.stderr)
            return EXIT_FAILED
    figures["problems"] = problems
    print("\n".join(machine_lines({})))
    print(json.dumps(figures, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    for problem in problems:
        print(f"soak: FAILED: {problem}", file=sys.stderr)
    return EXIT_FAILED if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
