"""Benchmark extproc beside Envoy 1.40 and beside the upstream alone, with one filter config.

    .venv/bin/python bench/run.py [--duration 10] [--repeat 3] [--connections 16]
                                  [--only proxy,req-headers,headers,buffered-post,streamed-64k]
                                  [--targets direct,h11-floor,extproc,extproc-pinned,
                                             extproc-2w,envoy]

Starts nginx (upstream), a no-op Python ext_proc processor, then for each workload each target
in turn, all on 127.0.0.1; every proxy gets the same ExternalProcessor `processing_mode`
(extproc as `--config`, Envoy in its bootstrap). wrk drives each at a fixed concurrency; the
script prints Markdown tables (also written to bench/results/latest.md): req/s, p50/p99 and
CPU µs per request of the target's whole process tree and of the processor, medians over the
repetitions. Exits 2 when wrk or nginx (or Envoy, if asked for) is missing.
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


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    label: str
    mode: dict[str, str]  # ExternalProcessor.processing_mode, as in Envoy's JSON
    method: str = "GET"
    path: str = "/"
    body_bytes: int = 0  # request body
    response_bytes: int = targets.BODY_BYTES


_SKIP = {"request_header_mode": "SKIP", "response_header_mode": "SKIP"}
WORKLOADS = [
    Workload("proxy", "proxy only (header modes SKIP: no processor traffic)", _SKIP),
    Workload("req-headers", "ext_proc request headers", {"response_header_mode": "SKIP"}),
    Workload("headers", "ext_proc request + response headers (Envoy's default)", {}),
    Workload(
        "buffered-post",
        "+ BUFFERED 4 KiB POST body",
        {"request_body_mode": "BUFFERED"},
        method="POST",
        body_bytes=4096,
    ),
    Workload(
        "streamed-64k",
        "+ STREAMED 64 KiB response",
        {"response_body_mode": "STREAMED"},
        path=targets.LARGE_PATH,
        response_bytes=targets.LARGE_BYTES,
    ),
]

# (workdir, nginx port, processor port, processing_mode) -> a started, listening target.
Starter = Callable[[Path, int, int, dict[str, str]], Proc]


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    label: str
    start: Starter | None  # None: wrk talks to nginx itself
    ext_proc: bool = True  # False: no processor traffic, so the proxy-only workload alone


def _extproc(name: str, *args: str) -> Starter:
    return lambda work, up, proc, mode: targets.start_extproc(
        work, up, proc, mode=mode, extra_args=args, name=name
    )


def _envoy(work: Path, up: int, proc: int, mode: dict[str, str]) -> Proc:
    return targets.start_envoy(work, up, proc, mode=mode)


def _h11_floor(work: Path, up: int, proc: int, mode: dict[str, str]) -> Proc:
    return targets.start_h11_floor(work, up)


TARGETS = [
    Target("direct", "nginx alone", None),
    Target("h11-floor", "plain h11 proxy, pinned", _h11_floor, ext_proc=False),
    Target("extproc", "extproc", _extproc("extproc")),
    Target(
        "extproc-pinned", "extproc --cpu-affinity", _extproc("extproc-pinned", "--cpu-affinity")
    ),
    Target(
        "extproc-2w",
        "extproc --workers 2 --cpu-affinity",
        _extproc("extproc-2w", "--workers", "2", "--cpu-affinity"),
    ),
    Target("envoy", "Envoy 1.40 --concurrency 1", _envoy),
]
NOTES = [
    "- CPU µs/req: utime+stime (/proc/PID/stat, all threads, whole process tree) of the target "
    "(for `nginx alone`, nginx itself) during the timed runs only, divided by requests served. "
    "Processor CPU is the same for the ext_proc processor process.",
    "- The processor is Python (grpc.aio, no-op replies, `bench/benchkit/processor.py`): it "
    "caps at a few thousand messages/s per core and shares the two cores with everything else, "
    "so it bounds req/s of the ext_proc workloads for both proxies; CPU µs/req of the proxy is "
    "the figure to compare.",
    "- `proxy only`: both header modes SKIP, for both proxies, so no stream is opened.",
    "- `plain h11 proxy` (`bench/benchkit/h11_floor.py`, proxy only): a thread per "
    "connection, h11 both sides, nothing else, pinned to one core: what any h11 proxy costs "
    "in CPython here.",
    "- `--cpu-affinity` pins each extproc process to one core; `--workers 2` runs two processes "
    "on one listening socket.",
    "- Everything (wrk -t1, nginx, processor, proxy) shares the machine's cores.",
    "- req/s, p50, p99 and CPU are medians over the repetitions; errors (wrk socket errors "
    "and non-2xx/3xx replies) are summed over them.",
]


def _pick(
    parser: argparse.ArgumentParser, flag: str, value: str, known: Sequence[str]
) -> list[str]:
    wanted = [n.strip() for n in value.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(known))
    if unknown or not wanted:
        parser.error(f"--{flag}: unknown name(s) {unknown}; choose from {','.join(known)}")
    return wanted


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=10, help="seconds per timed run")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per workload")
    parser.add_argument("--connections", type=int, default=16, help="wrk -c")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t (wrk competes for CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed seconds before the runs")
    workloads = [w.name for w in WORKLOADS]
    names = [t.name for t in TARGETS]
    parser.add_argument("--only", default=",".join(workloads), help="workloads, comma list")
    parser.add_argument("--targets", default=",".join(names), help="targets, comma list")
    args = parser.parse_args(argv)
    for flag in ("duration", "repeat", "connections", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    wanted = _pick(parser, "only", args.only, workloads)
    args.workloads = [w for w in WORKLOADS if w.name in wanted]
    wanted = _pick(parser, "targets", args.targets, names)
    args.target_list = [t for t in TARGETS if t.name in wanted]
    return args


def _check_tools(target_list: Sequence[Target]) -> str | None:
    """What is missing, phrased as what to run, or None."""
    missing = targets.missing_tools()
    if missing:
        return f"missing {', '.join(missing)}; install with: {targets.APT_COMMAND}"
    if any(t.name == "envoy" for t in target_list) and not targets.envoy_available():
        return "no runnable Envoy: run `make envoy` or set EXTPROC_ENVOY_BIN"
    return None


def _verify(proc: Proc, workload: Workload) -> None:
    """One request before measuring: a broken target would otherwise benchmark its errors."""
    body = b"x" * workload.body_bytes
    status, got = http_get(proc.port, workload.path, method=workload.method, body=body)
    if status != 200 or len(got) != workload.response_bytes:
        raise StartError(
            f"{proc.name}: {workload.method} {workload.path} answered {status} with "
            f"{len(got)} bytes\n{proc.tail()}"
        )


@contextlib.contextmanager
def _running(proc: Proc) -> Iterator[Proc]:
    try:
        yield proc
    finally:
        proc.stop()


@dataclasses.dataclass(frozen=True)
class _Run:
    """What one measurement needs besides the target."""

    processor: Proc
    nginx: Proc
    args: argparse.Namespace
    script: Path
    workload: Workload


def _measure(target: Proc, run: _Run, label: str) -> list[Sample]:
    args = run.args

    def wrk(seconds: int) -> Sample:
        before = read_cpu(target, run.processor, run.nginx)
        result = run_wrk(
            target.port,
            duration_s=seconds,
            connections=args.connections,
            threads=args.threads,
            script=run.script,
            path=run.workload.path,
        )
        return Sample(result, read_cpu(target, run.processor, run.nginx).minus(before))

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


def _bench(target: Target, run: _Run, work: Path) -> Row:
    workload = run.workload
    label = f"{workload.name}/{target.name}"
    print(f"{label}: {target.label}, {workload.label}", file=sys.stderr)
    if target.start is None:
        _verify(run.nginx, workload)
        samples = _measure(run.nginx, run, label)
    else:
        started = target.start(work, run.nginx.port, run.processor.port, workload.mode)
        with _running(started) as proc:
            _verify(proc, workload)
            samples = _measure(proc, run, label)
    return Row(workload.label, target.label, samples)


def _run(args: argparse.Namespace, work: Path) -> list[Row]:
    rows = []
    with (
        _running(targets.start_nginx(work)) as nginx,
        _running(targets.start_processor(work)) as processor,
    ):
        for workload in args.workloads:
            script = write_script(
                work, workload.name, method=workload.method, body_bytes=workload.body_bytes
            )
            run = _Run(processor, nginx, args, script, workload)
            rows += [
                _bench(target, run, work)
                for target in args.target_list
                if target.ext_proc or workload.mode == _SKIP
            ]
    return rows


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through every `finally`, so the children get stopped.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str]) -> int:
    args = _parse_args(argv)
    problem = _check_tools(args.target_list)
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
        f"(+{args.warmup} s warm-up); nginx answers `GET /` and `POST /` with "
        f"{targets.BODY_BYTES} B, `GET {targets.LARGE_PATH}` with {targets.LARGE_BYTES} B",
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
