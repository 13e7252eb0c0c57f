"""Benchmark extproc beside Envoy 1.40 and beside the plain h11 floors, with one filter config.

    .venv/bin/python bench/run.py [--duration 10] [--repeat 3] [--connections 16]
                                  [--only proxy,req-headers,headers,buffered-post,streamed-64k]
                                  [--targets h11-floor,h11-floor-stream,extproc,envoy]
                                  [--processor cpp|python] [--extproc-variant NAME=FLAGS ...]

Starts nginx (upstream), a no-op ext_proc processor (C++ by default), then for each workload
each target in turn, all on 127.0.0.1; every proxy gets the same ExternalProcessor
`processing_mode` (extproc as `--config`, Envoy in its bootstrap). The proxy under test runs
alone on the first CPU, everything else (wrk, nginx, the processor, this script) on the
others. wrk drives each at a fixed concurrency; the script prints Markdown tables (also
written to bench/results/latest.md): req/s, p50/p99 and CPU µs per request of the target's
whole process tree and of the processor, medians over the repetitions, and extproc's CPU over
the floor's. Exits 2 when wrk, nginx, the C++ processor (or Envoy, if asked for) is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from benchkit import targets
from benchkit.processor_check import check_processor
from benchkit.procs import Proc, StartError, http_get, read_cpu
from benchkit.report import Floor, Row, Sample, load_average, render
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
    floor: str | None = None  # the target extproc's CPU is divided by, here
    goal: float = 0.0  # issue #13's ceiling for that ratio

    @property
    def response_headers(self) -> bool:
        return self.mode.get("response_header_mode") != "SKIP"


_SKIP = {"request_header_mode": "SKIP", "response_header_mode": "SKIP"}
WORKLOADS = [
    Workload(
        "proxy",
        "proxy only (header modes SKIP: no processor traffic)",
        _SKIP,
        floor="h11-floor",
        goal=1.5,
    ),
    Workload(
        "req-headers",
        "ext_proc request headers",
        {"response_header_mode": "SKIP"},
        floor="h11-floor-stream",
        goal=1.25,
    ),
    Workload(
        "headers",
        "ext_proc request + response headers (Envoy's default)",
        {},
        floor="h11-floor-stream",
        goal=1.25,
    ),
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


@dataclasses.dataclass(frozen=True)
class Slot:
    """What a target is started with: where, in front of what, for which workload."""

    workdir: Path
    upstream: int  # nginx's port
    processor: int
    workload: Workload
    cpus: frozenset[int] | None  # the proxy's CPU; None: not pinned


Starter = Callable[[Slot], Proc]  # a started, listening target


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    label: str
    start: Starter | None  # None: wrk talks to nginx itself
    workloads: frozenset[str] | None = None  # the ones it runs; None: all
    compared: bool = False  # an extproc: its CPU is divided by the workload's floor's


def _extproc(name: str, args: Sequence[str]) -> Starter:
    return lambda slot: targets.start_extproc(
        slot.workdir,
        slot.upstream,
        slot.processor,
        mode=slot.workload.mode,
        extra_args=args,
        name=name,
        cpus=slot.cpus,
    )


def _envoy(slot: Slot) -> Proc:
    return targets.start_envoy(
        slot.workdir, slot.upstream, slot.processor, mode=slot.workload.mode, cpus=slot.cpus
    )


def _h11_floor(slot: Slot) -> Proc:
    return targets.start_h11_floor(slot.workdir, slot.upstream, cpus=slot.cpus)


def _h11_floor_stream(slot: Slot) -> Proc:
    return targets.start_h11_floor(
        slot.workdir,
        slot.upstream,
        cpus=slot.cpus,
        processor=slot.processor,
        response_headers=slot.workload.response_headers,
        name="h11-floor-stream",
    )


TARGETS = [
    Target("direct", "nginx alone", None),
    Target("h11-floor", "h11 floor", _h11_floor, workloads=frozenset({"proxy"})),
    Target(
        "h11-floor-stream",
        "h11 floor + stream",
        _h11_floor_stream,
        workloads=frozenset({"req-headers", "headers"}),
    ),
    Target("extproc", "extproc", _extproc("extproc", ()), compared=True),
    # The synchronous-stub gRPC client, while it is being written.
    Target(
        "extproc-stub",
        "extproc --grpc-client stub",
        _extproc("extproc-stub", ("--grpc-client", "stub")),
        compared=True,
    ),
    Target("envoy", "Envoy 1.40 --concurrency 1", _envoy),
]
DEFAULT_TARGETS = ("h11-floor", "h11-floor-stream", "extproc", "envoy")
NOTES = [
    "- CPU µs/req: utime+stime (/proc/PID/stat, all threads, whole process tree) of the target "
    "(for `nginx alone`, nginx itself) during the timed runs only, divided by requests served. "
    "Processor CPU is the same for the ext_proc processor process.",
    "- Pinning: the target runs alone on one CPU; wrk -t1, nginx, the processor and the "
    "harness share the other. CPU µs/req of the target is the figure to compare; req/s is "
    "bounded by whichever of the two CPUs saturates first.",
    "- The processor answers each message with the empty response of the same kind. The C++ "
    "one (`bench/cpp_processor`, grpc++ generic callback API) costs a few µs per message; the "
    "Python one (`bench/benchkit/processor.py`, grpc.aio) as much as a proxy.",
    "- `proxy only`: both header modes SKIP, for every proxy, so no stream is opened.",
    "- `h11 floor` (`bench/benchkit/h11_floor.py`, proxy only): a thread per connection, h11 "
    "both sides, nothing else: what any h11 proxy costs in CPython here. `h11 floor + stream` "
    "(header workloads): the same, plus one ext_proc stream per request driven from the "
    "connection's thread through grpcio's segregated call (`bench/benchkit/floor_stream.py`): "
    "request headers, and response headers when the workload sends them; the empty replies "
    "are parsed and nothing is applied.",
    "- `X / floor`: X's CPU µs/req divided by the floor's of the same workload (`h11 floor` "
    "for proxy only, `h11 floor + stream` for the header workloads); goal: issue #13's "
    "ceiling. The body workloads have no floor: compare them with Envoy.",
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


def _variant(parser: argparse.ArgumentParser, spec: str, taken: Sequence[str]) -> Target:
    """An extproc target from ``NAME=FLAGS`` (FLAGS split as a shell would)."""
    name, sep, flags = spec.partition("=")
    name = name.strip()
    if not sep or not name or "," in name or name in taken:
        parser.error(f"--extproc-variant {spec!r}: want a new NAME=FLAGS, e.g. 'w2=--workers 2'")
    return Target(
        name, f"extproc {flags.strip()}", _extproc(name, shlex.split(flags)), compared=True
    )


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
    parser.add_argument(
        "--targets", default=",".join(DEFAULT_TARGETS), help=f"comma list of {','.join(names)}"
    )
    parser.add_argument(
        "--processor", choices=targets.PROCESSORS, default="cpp", help="the no-op processor"
    )
    parser.add_argument(
        "--extproc-variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="one more extproc target, run after --targets, with these extra flags "
        "(repeatable), e.g. 'stub=--grpc-client stub'",
    )
    args = parser.parse_args(argv)
    for flag in ("duration", "repeat", "connections", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    wanted = _pick(parser, "only", args.only, workloads)
    args.workloads = [w for w in WORKLOADS if w.name in wanted]
    wanted = _pick(parser, "targets", args.targets, names)
    args.target_list = [t for t in TARGETS if t.name in wanted]
    for spec in args.extproc_variant:
        args.target_list.append(
            _variant(parser, spec, [t.name for t in TARGETS + args.target_list])
        )
    return args


def _check_tools(args: argparse.Namespace) -> str | None:
    """What is missing, phrased as what to run, or None."""
    missing = targets.missing_tools()
    if missing:
        return f"missing {', '.join(missing)}; install with: {targets.APT_COMMAND}"
    if args.processor == "cpp" and not os.access(targets.CPP_PROCESSOR_BIN, os.X_OK):
        return f"no {targets.CPP_PROCESSOR_BIN}: run `make bench-tools` (or --processor python)"
    if any(t.name == "envoy" for t in args.target_list) and not targets.envoy_available():
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
    cpus: frozenset[int] | None  # the target's


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
        slot = Slot(work, run.nginx.port, run.processor.port, workload, run.cpus)
        with _running(target.start(slot)) as proc:
            _verify(proc, workload)
            samples = _measure(proc, run, label)
    return Row(workload.label, target.label, samples)


def _split_cpus() -> tuple[frozenset[int] | None, frozenset[int] | None]:
    """(the target's CPU, everyone else's): the lowest allowed CPU, and the rest; (None, None)
    when there is only one."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None, None
    return frozenset(allowed[:1]), frozenset(allowed[1:])


def _run(args: argparse.Namespace, work: Path, cpus: frozenset[int] | None) -> list[Row]:
    rows = []
    with (
        _running(targets.start_nginx(work)) as nginx,
        _running(targets.start_processor(work, args.processor)) as processor,
    ):
        check_processor(processor.port)
        for workload in args.workloads:
            script = write_script(
                work, workload.name, method=workload.method, body_bytes=workload.body_bytes
            )
            run = _Run(processor, nginx, args, script, workload, cpus)
            rows += [
                _bench(target, run, work)
                for target in args.target_list
                if target.workloads is None or workload.name in target.workloads
            ]
    return rows


def _cpu_list(cpus: frozenset[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def _floors(args: argparse.Namespace) -> list[Floor]:
    by_name = {t.name: t.label for t in TARGETS}
    return [Floor(w.label, by_name[w.floor], w.goal) for w in args.workloads if w.floor is not None]


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through every `finally`, so the children get stopped.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str]) -> int:
    args = _parse_args(argv)
    problem = _check_tools(args)
    if problem is not None:
        print(f"bench: {problem}", file=sys.stderr)
        return EXIT_MISSING
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    target_cpus, other_cpus = _split_cpus()
    if other_cpus is not None:
        # Inherited by every child but the targets: wrk, nginx and the processor.
        os.sched_setaffinity(0, other_cpus)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="extproc-bench-") as tmp:
        try:
            rows = _run(args, Path(tmp), target_cpus)
        except (StartError, RuntimeError) as err:
            print(f"bench: {err}", file=sys.stderr)
            return EXIT_FAILED
    pinning = (
        f"target on CPU {_cpu_list(target_cpus)}; wrk, nginx, processor and harness on "
        f"CPU {_cpu_list(other_cpus)}"
        if target_cpus is not None and other_cpus is not None
        else "none (one CPU)"
    )
    settings = [
        f"- run: wrk -t{args.threads} -c{args.connections}, {args.duration} s x {args.repeat} "
        f"(+{args.warmup} s warm-up); nginx answers `GET /` and `POST /` with "
        f"{targets.BODY_BYTES} B, `GET {targets.LARGE_PATH}` with {targets.LARGE_BYTES} B",
        f"- processor: {args.processor}; pinning: {pinning}",
        f"- load average at start: {load_before}",
    ]
    compared = [t.label for t in args.target_list if t.compared]
    columns = [t.label for t in args.target_list]
    report = render(
        rows, settings, targets.tool_versions(), NOTES, _floors(args), compared, columns
    )
    print(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(f"(written to {RESULTS})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
