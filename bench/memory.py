"""Measure extproc's resident memory while large bodies stream through it.

    .venv/bin/python bench/memory.py [--size 1GiB] [--connections 1000]
                                     [--only request-none,response-none,request-streamed,
                                             response-streamed,idle-keepalive]

Starts a large-body upstream (`benchkit.bulk_upstream`, its own process), the no-op ext_proc
processor and, per workload, a fresh extproc, all on 127.0.0.1. Each body workload sends one
--size body through extproc (request or response, body mode NONE or STREAMED) while VmRSS of
the extproc process is sampled every 100 ms; idle-keepalive parks --connections keep-alive
connections on it. Prints a Markdown table, also written to bench/results/memory.md, and exits
1 when a byte count is wrong or a workload failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import h11
from benchkit import targets
from benchkit.bulk_client import Transfer, close_all, exchange, open_idle
from benchkit.memstat import RssSampler
from benchkit.procs import (
    Proc,
    StartError,
    open_files_limit,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)
from benchkit.report import load_average, machine_lines

RESULTS = Path(__file__).resolve().parent / "results" / "memory.md"
EXIT_FAILED = 1
MIB = 1 << 20
GIB = 1 << 30
# A small exchange of the same kind first: starts worker threads, the gRPC channel and lazy
# imports, so the idle RSS already holds them and growth is what the big body costs.
WARMUP_BYTES = MIB
# Lets freed memory and finishing threads settle before a reading that is meant to be quiet.
SETTLE_S = 0.5
# Descriptors the benchmark itself needs besides the idle connections (processes, logs...).
FD_MARGIN = 256
# How extproc is left to grow before a workload counts as suspicious (the brief's threshold).
GROWTH_ALERT = 100 * 10**6


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    label: str
    kind: str  # "request" or "response": which body is large; "idle": keep-alive connections
    extproc_args: tuple[str, ...] = ()


WORKLOADS = [
    Workload("request-none", "request body, body mode NONE", "request"),
    Workload("response-none", "response body, body mode NONE", "response"),
    Workload(
        "request-streamed",
        "request body, STREAMED (processor answers each chunk unchanged)",
        "request",
        ("--request-body-mode", "streamed"),
    ),
    Workload(
        "response-streamed",
        "response body, STREAMED (processor answers each chunk unchanged)",
        "response",
        ("--response-body-mode", "streamed"),
    ),
    Workload("idle-keepalive", "idle keep-alive connections (headers to processor)", "idle"),
]


@dataclasses.dataclass
class Row:
    """One workload's measurements; `problems` non-empty means it failed."""

    workload: Workload
    size: str
    idle_rss: int = 0
    peak_rss: int = 0
    seconds: float | None = None
    moved: int = 0  # body bytes the timing covers, for MB/s
    details: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def growth(self) -> int:
        return self.peak_rss - self.idle_rss


# Arguments ------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": MIB}
_UNITS["gib"] = GIB


def parse_size(text: str) -> int:
    """'1GiB', '512MiB', '100MB' or plain bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]i?b|b)?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1GiB, 64MiB, 1000000)")
    value = int(match.group(1)) * _UNITS[match.group(2) or ""]
    if value < 1:
        raise argparse.ArgumentTypeError("size must be at least 1 byte")
    return value


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=parse_size, default=GIB, help="body size (1GiB)")
    parser.add_argument("--connections", type=int, default=1000, help="idle keep-alive count")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per transfer")
    names = ",".join(w.name for w in WORKLOADS)
    parser.add_argument("--only", default=names, help=f"comma list out of {names}")
    args = parser.parse_args(argv)
    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {w.name for w in WORKLOADS})
    if unknown or not wanted:
        parser.error(f"--only: unknown workload(s) {unknown}; choose from {names}")
    if args.connections < 1 or args.timeout <= 0:
        parser.error("--connections and --timeout must be positive")
    args.workloads = [w for w in WORKLOADS if w.name in wanted]
    return args


# Measuring ------------------------------------------------------------------------------


def _quiet_rss(proc: Proc) -> int:
    time.sleep(SETTLE_S)
    return rss_bytes(proc.pid)


def _check_transfer(kind: str, size: int, result: Transfer) -> list[str]:
    """Every way the byte counts (or the status) can be wrong, as sentences."""
    problems = [] if result.status == 200 else [f"status {result.status}"]
    if kind == "request":
        if result.sent != size or result.upstream_received != size:
            problems.append(
                f"request body: client sent {result.sent}, upstream received "
                f"{result.upstream_received}, expected {size}"
            )
    elif result.received != size:
        problems.append(f"response body: client received {result.received}, expected {size}")
    return problems


def _transfer(port: int, kind: str, size: int, timeout_s: float) -> Transfer:
    body, respond = (size, 0) if kind == "request" else (0, size)
    return exchange(port, body=body, respond=respond, timeout_s=timeout_s)


def _hwm_note(proc: Proc, reset: bool) -> str:
    if not reset:
        return "kernel peak (VmHWM) unavailable: clear_refs not writable"
    return f"kernel peak VmHWM {_mib(peak_rss_bytes(proc.pid))}"


def _cpu_note(before: tuple[float, float], proc: Proc, processor: Proc) -> str:
    # Processor CPU shows the STREAMED chunks really went through it (and NONE did not).
    used = (proc.cpu_seconds() - before[0], processor.cpu_seconds() - before[1])
    return f"CPU during it: extproc {used[0]:.1f} s, processor {used[1]:.1f} s"


def _measure_body(proc: Proc, processor: Proc, args: argparse.Namespace, row: Row) -> None:
    kind = row.workload.kind
    warm = _transfer(proc.port, kind, WARMUP_BYTES, args.timeout)
    row.problems += [f"warm-up: {p}" for p in _check_transfer(kind, WARMUP_BYTES, warm)]
    row.idle_rss = _quiet_rss(proc)
    reset = reset_peak_rss(proc.pid)
    cpu = (proc.cpu_seconds(), processor.cpu_seconds())
    with RssSampler(proc.pid) as sampler:
        result = _transfer(proc.port, kind, args.size, args.timeout)
    row.details.append(_cpu_note(cpu, proc, processor))
    row.seconds, row.moved = result.seconds, args.size
    row.peak_rss = sampler.peak
    row.problems += _check_transfer(kind, args.size, result)
    row.details += [
        _hwm_note(proc, reset),
        f"{len(sampler.samples)} samples",
        f"RSS {SETTLE_S:g} s after: {_mib(_quiet_rss(proc))}",
    ]


def _fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _measure_idle(proc: Proc, processor: Proc, args: argparse.Namespace, row: Row) -> None:
    warm = exchange(proc.port, body=0, respond=16, timeout_s=args.timeout)
    if warm.status != 200 or warm.received != 16:
        row.problems.append(f"warm-up GET: {warm.status} with {warm.received} B")
    row.idle_rss = _quiet_rss(proc)
    reset = reset_peak_rss(proc.pid)
    started = time.monotonic()
    with RssSampler(proc.pid) as sampler:
        socks = open_idle(proc.port, args.connections, timeout_s=args.timeout)
        row.seconds = time.monotonic() - started
        try:
            time.sleep(SETTLE_S)  # the last connections get parked; then the sampler reads
            fds = _fd_count(proc.pid)
        finally:
            close_all(socks)
    # The exit sample comes after closing; only samples taken while they were open count.
    open_samples = [rss for at, rss in sampler.samples if at <= started + row.seconds + SETTLE_S]
    row.peak_rss = max(open_samples, default=sampler.peak)
    row.details += [
        _hwm_note(proc, reset),
        f"extproc held {fds} fds with them open",
        f"extproc RLIMIT_NOFILE {open_files_limit(proc.pid)}",
        f"{row.seconds / args.connections * 1000:.2f} ms per connection to open",
    ]


def _bench(
    workload: Workload, upstream: Proc, processor: Proc, work: Path, args: argparse.Namespace
) -> Row:
    size = f"{args.connections:,} conns" if workload.kind == "idle" else _size_text(args.size)
    row = Row(workload, size)
    print(f"{workload.name}: {workload.label}, {size}", file=sys.stderr)
    measure = _measure_idle if workload.kind == "idle" else _measure_body
    proc = targets.start_extproc(
        work,
        upstream.port,
        processor.port,
        mode={},
        extra_args=workload.extproc_args,
        name=f"extproc-{workload.name}",
    )
    try:
        row.details.insert(0, f"RSS at start {_mib(rss_bytes(proc.pid))}")
        measure(proc, processor, args, row)
    except (OSError, h11.ProtocolError) as err:
        row.problems.append(f"{type(err).__name__}: {err}\n{proc.tail()}")
    finally:
        proc.stop()
    _print_progress(row)
    return row


def _print_progress(row: Row) -> None:
    status = "FAILED: " + "; ".join(row.problems) if row.problems else "ok"
    seconds = f"{row.seconds:.1f} s" if row.seconds is not None else "-"
    print(
        f"  {seconds}, idle {_mib(row.idle_rss)}, peak {_mib(row.peak_rss)}, "
        f"growth {_mib(row.growth)}; {', '.join(row.details)} -- {status}",
        file=sys.stderr,
    )


def raise_open_files_limit(needed: int) -> str:
    """Raise our soft RLIMIT_NOFILE to `needed` if lower; extproc, started by us, inherits it.

    Returns what was done, for the report.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return f"RLIMIT_NOFILE {soft}/{hard} already enough (needed {needed})"
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target >= needed:
        return f"RLIMIT_NOFILE raised from {soft} to {target} (hard {hard}) for {needed} needed"
    # Only root may raise the hard limit; say so instead of failing later with EMFILE.
    message = (
        f"RLIMIT_NOFILE {target}/{hard} is below the {needed} needed (hard limit): "
        "idle-keepalive may fail with EMFILE; raise `ulimit -Hn` or lower --connections"
    )
    print(f"bench-memory: warning: {message}", file=sys.stderr)
    return message


@contextmanager
def _running(start: Callable[[], Proc]) -> Iterator[Proc]:
    proc = start()
    try:
        yield proc
    finally:
        proc.stop()


def _run(args: argparse.Namespace, work: Path) -> list[Row]:
    with (
        _running(lambda: targets.start_bulk_upstream(work)) as upstream,
        _running(lambda: targets.start_processor(work)) as processor,
    ):
        return [_bench(w, upstream, processor, work, args) for w in args.workloads]


# Report ---------------------------------------------------------------------------------


def _mib(value: int) -> str:
    return f"{value / MIB:,.1f} MiB"


def _size_text(size: int) -> str:
    for unit, factor in (("GiB", GIB), ("MiB", MIB), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size:,} B"


def _table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| workload | size | time | MB/s | idle RSS | peak RSS | growth |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        name = row.workload.label + (" **FAILED**" if row.problems else "")
        seconds = f"{row.seconds:.1f} s" if row.seconds is not None else "-"
        rate = f"{row.moved / row.seconds / 1e6:,.1f}" if row.moved and row.seconds else "-"
        lines.append(
            f"| {name} | {row.size} | {seconds} | {rate} | {_mib(row.idle_rss)} "
            f"| {_mib(row.peak_rss)} | {_mib(row.growth)} |"
        )
    return lines


NOTES = [
    "- RSS is VmRSS of the whole extproc process (/proc/PID/status, all threads). Each "
    "workload runs on a fresh extproc; idle RSS is read after a 1 MiB warm-up exchange of the "
    "same kind (so threads, the gRPC channel and lazy imports are already in it).",
    "- peak RSS is the highest VmRSS sampled every 100 ms during the transfer (or while the "
    "idle connections were open); growth = peak - idle. The kernel's own high-water mark "
    "(VmHWM, reset before the transfer through clear_refs) is listed below as a cross-check; "
    "the kernel updates it lazily, so it can read a little below the sampled peak.",
    "- time: from connecting to the last response byte; MB/s = body bytes / time, 10^6 B.",
    "- Header modes stay SEND (request and response headers go to the processor); the "
    "processor is the no-op `benchkit/processor.py` (Python grpc.aio).",
    "- Idle connections: each client socket sent one keep-alive GET (16-byte response) and "
    "stays open, parked in extproc's selector. Every one costs extproc a file descriptor: "
    "run extproc with `ulimit -n` above the connection count (its limit is listed below; "
    "here it inherits the benchmark's, raised with setrlimit).",
]


def render(rows: Sequence[Row], settings: list[str]) -> str:
    parts = ["# extproc memory benchmark", "", *machine_lines({}), *settings, ""]
    parts += _table(rows)
    parts += ["", *NOTES, ""]
    for row in rows:
        parts.append(f"- {row.workload.name}: {'; '.join(row.details)}")
        parts += [f"  - PROBLEM: {problem.splitlines()[0]}" for problem in row.problems]
    return "\n".join(parts) + "\n"


# Main -----------------------------------------------------------------------------------


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through every `finally`, so the children get stopped.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str]) -> int:
    args = _parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    limits = raise_open_files_limit(args.connections + FD_MARGIN)
    settings = [
        f"- body size {args.size:,} B; idle connections {args.connections:,}; {limits}",
        f"- load average at start: {load_average()}",
    ]
    with tempfile.TemporaryDirectory(prefix="extproc-memory-") as tmp:
        try:
            rows = _run(args, Path(tmp))
        except (StartError, RuntimeError) as err:
            print(f"bench-memory: {err}", file=sys.stderr)
            return EXIT_FAILED
    report = render(rows, settings)
    print(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(f"(written to {RESULTS})", file=sys.stderr)
    return EXIT_FAILED if any(row.problems for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
