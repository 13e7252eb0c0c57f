"""Benchmark extproc against Envoy 1.40 with the same ext_proc setup, behind wrk.

    .venv/bin/python bench/run.py [--duration 10] [--repeat 3] [--connections 16]
                                  [--only direct,extproc-skip,extproc,envoy-skip,envoy]

Starts nginx (upstream), a no-op Python ext_proc processor, then each proxy in turn, all on
127.0.0.1; drives each with wrk and prints a Markdown table, also written to
bench/results/latest.md. Exits 2 when wrk or nginx (or Envoy, if asked for) is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from benchkit import targets
from benchkit.procs import Proc, StartError, http_get, read_cpu
from benchkit.report import Row, Sample, load_average, render
from benchkit.wrk import run_wrk, write_script

RESULTS = Path(__file__).resolve().parent / "results" / "latest.md"
EXIT_MISSING = 2
EXIT_FAILED = 1

# (workdir, nginx port, processor port) -> a started, listening target.
Starter = Callable[[Path, int, int], Proc]


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    label: str
    target: str
    start: Starter | None  # None: wrk talks to nginx itself


def _extproc(skip: bool) -> Starter:
    return lambda work, up, proc: targets.start_extproc(work, up, proc, skip=skip)


def _envoy(skip: bool) -> Starter:
    return lambda work, up, proc: targets.start_envoy(work, up, proc, skip=skip)


_SKIP = "ext_proc, header modes SKIP (no processor traffic)"
_SEND = "ext_proc, request+response headers"
WORKLOADS = [
    Workload("direct", "no proxy (reference)", "nginx", None),
    Workload("extproc-skip", _SKIP, "extproc", _extproc(skip=True)),
    Workload("extproc", _SEND, "extproc", _extproc(skip=False)),
    Workload("envoy-skip", _SKIP, "Envoy 1.40", _envoy(skip=True)),
    Workload("envoy", _SEND, "Envoy 1.40", _envoy(skip=False)),
]
NOTES = [
    "- CPU µs/req: utime+stime (/proc/PID/stat, all threads, whole process tree) of the target "
    "(for `nginx` the upstream itself) during the timed runs only, divided by requests served. "
    "Processor CPU is the same for the ext_proc processor process.",
    "- The processor is Python (grpc.aio, no-op replies): it caps at a few thousand "
    "messages/s per core, and the header workloads send it two messages on a fresh gRPC "
    "stream per request, so it can be the bottleneck for both proxies.",
    "- extproc cannot turn ext_proc off; its SKIP/SKIP row stands in for 'ext_proc disabled'. "
    "Envoy gets the same processing_mode.",
    "- Everything (wrk -t1, nginx, processor, proxy) shares the machine's cores; no pinning.",
    "- req/s, p50, p99 and CPU are medians over the repetitions; errors (wrk socket errors "
    "and non-2xx/3xx replies) are summed over them.",
]


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=10, help="seconds per timed run")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per workload")
    parser.add_argument("--connections", type=int, default=16, help="wrk -c")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t (wrk competes for CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed seconds before the runs")
    names = ",".join(w.name for w in WORKLOADS)
    parser.add_argument("--only", default=names, help=f"comma list out of {names}")
    args = parser.parse_args(argv)
    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {w.name for w in WORKLOADS})
    if unknown or not wanted:
        parser.error(f"--only: unknown workload(s) {unknown}; choose from {names}")
    for flag in ("duration", "repeat", "connections", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    args.workloads = [w for w in WORKLOADS if w.name in wanted]
    return args


def _check_tools(workloads: Sequence[Workload]) -> str | None:
    """What is missing, phrased as what to run, or None."""
    missing = targets.missing_tools()
    if missing:
        return f"missing {', '.join(missing)}; install with: {targets.APT_COMMAND}"
    if any(w.name.startswith("envoy") for w in workloads) and not targets.envoy_available():
        return "no runnable Envoy: run `make envoy` or set EXTPROC_ENVOY_BIN"
    return None


def _verify(proc: Proc) -> None:
    """One request before measuring: a broken target would otherwise benchmark its errors."""
    status, body = http_get(proc.port)
    if status != 200 or len(body) != targets.BODY_BYTES:
        raise StartError(
            f"{proc.name}: GET / answered {status} with {len(body)} bytes\n{proc.tail()}"
        )


@contextlib.contextmanager
def _running(proc: Proc) -> Iterator[Proc]:
    try:
        yield proc
    finally:
        proc.stop()


def _measure(
    target: Proc, processor: Proc, nginx: Proc, args: argparse.Namespace, script: Path, label: str
) -> list[Sample]:
    def wrk(seconds: int) -> Sample:
        before = read_cpu(target, processor, nginx)
        result = run_wrk(
            target.port,
            duration_s=seconds,
            connections=args.connections,
            threads=args.threads,
            script=script,
        )
        return Sample(result, read_cpu(target, processor, nginx).minus(before))

    if args.warmup > 0:
        wrk(args.warmup)  # opens the proxies' upstream and processor connections, pages code in
    samples = []
    for i in range(args.repeat):
        sample = wrk(args.duration)
        samples.append(sample)
        print(
            f"  {label} run {i + 1}/{args.repeat}: {sample.wrk.rps:,.0f} req/s, "
            f"p99 {sample.wrk.p99_us / 1000:.2f} ms, CPU {sample.target_cpu_us:.0f} µs/req, "
            f"other processes {sample.others_share:.0%} of a core",
            file=sys.stderr,
        )
    return samples


def _bench_workload(
    workload: Workload,
    nginx: Proc,
    processor: Proc,
    work: Path,
    args: argparse.Namespace,
    script: Path,
) -> Row:
    print(f"{workload.name}: {workload.target}, {workload.label}", file=sys.stderr)
    if workload.start is None:
        _verify(nginx)
        samples = _measure(nginx, processor, nginx, args, script, workload.name)
    else:
        with _running(workload.start(work, nginx.port, processor.port)) as target:
            _verify(target)
            samples = _measure(target, processor, nginx, args, script, workload.name)
    return Row(workload.label, workload.target, samples)


def _run(args: argparse.Namespace, work: Path) -> list[Row]:
    script = write_script(work)
    with (
        _running(targets.start_nginx(work)) as nginx,
        _running(targets.start_processor(work)) as processor,
    ):
        return [
            _bench_workload(workload, nginx, processor, work, args, script)
            for workload in args.workloads
        ]


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through every `finally`, so the children get stopped.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str]) -> int:
    args = _parse_args(argv)
    problem = _check_tools(args.workloads)
    if problem is not None:
        print(f"bench: {problem}", file=sys.stderr)
        return EXIT_MISSING
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="extproc-bench-") as tmp:
        try:
            rows = _run(args, Path(tmp))
        except (StartError, RuntimeError) as err:
            print(f"bench: {err}", file=sys.stderr)
            return EXIT_FAILED
    settings = [
        f"- run: wrk -t{args.threads} -c{args.connections}, {args.duration} s x {args.repeat} "
        f"(+{args.warmup} s warm-up), GET / -> nginx 200 with a {targets.BODY_BYTES} B body",
        f"- load average at start: {load_before}",
    ]
    report = render(rows, settings, targets.tool_versions(), NOTES)
    print(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(f"(written to {RESULTS})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
