"""Turn repeated measurements into the Markdown report."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path

from benchkit.procs import CpuReading
from benchkit.wrk import WrkResult


@dataclasses.dataclass(frozen=True)
class Sample:
    """One timed wrk run and the CPU used during it."""

    wrk: WrkResult
    cpu: CpuReading  # differences over the run

    def cpu_us_per_request(self, seconds: float) -> float:
        return seconds * 1e6 / self.wrk.requests if self.wrk.requests else float("nan")

    @property
    def target_cpu_us(self) -> float:
        return self.cpu_us_per_request(self.cpu.target)

    @property
    def processor_cpu_us(self) -> float:
        return self.cpu_us_per_request(self.cpu.processor)

    @property
    def others_share(self) -> float:
        """Cores' worth of CPU that other processes used during the run (0.25 = a quarter)."""
        return self.cpu.others / self.cpu.wall if self.cpu.wall > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class Floor:
    """In ``workload``, the compared targets' CPU is divided by ``target``'s (a floor), and
    the issue asks for at most ``goal``. Both are labels, as in `Row`."""

    workload: str
    target: str
    goal: float


@dataclasses.dataclass(frozen=True)
class Row:
    workload: str
    target: str
    samples: Sequence[Sample]

    def median(self, values: Sequence[float]) -> float:
        return statistics.median(values) if values else float("nan")

    @property
    def rps(self) -> float:
        return self.median([s.wrk.rps for s in self.samples])

    @property
    def p50_us(self) -> float:
        return self.median([s.wrk.p50_us for s in self.samples])

    @property
    def p99_us(self) -> float:
        return self.median([s.wrk.p99_us for s in self.samples])

    @property
    def cpu_us(self) -> float:
        return self.median([s.target_cpu_us for s in self.samples])

    @property
    def processor_cpu_us(self) -> float:
        return self.median([s.processor_cpu_us for s in self.samples])

    def errors(self) -> str:
        """Errors summed over all repetitions: one is already worth seeing."""
        totals: dict[str, int] = {}
        for sample in self.samples:
            for kind, count in sample.wrk.errors.items():
                totals[kind] = totals.get(kind, 0) + count
        shown = [f"{kind} {count}" for kind, count in totals.items() if count]
        return ", ".join(shown) if shown else "0"


def quietness_note(rows: Sequence[Row]) -> str:
    """How much CPU processes outside the benchmark took: the numbers are only as good as that."""
    worst = max(
        ((s.others_share, row) for row in rows for s in row.samples),
        key=lambda pair: pair[0],
        default=None,
    )
    if worst is None:
        return "- no samples"
    share, row = worst
    return (
        f"- CPU used by processes outside the benchmark during the timed runs: at most "
        f"{share:.0%} of one core ({row.target}, {row.workload})"
        + (" -- the machine was busy; treat these numbers with care." if share > 0.1 else ".")
    )


def _latency(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def load_average() -> str:
    """The 1/5/15-minute load: a busy machine (other jobs sharing the cores) skews everything."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine_lines(tools: dict[str, str]) -> list[str]:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"- date: {now}",
        # The machine's, not this process's: run.py pins itself to all CPUs but one.
        f"- CPUs: {os.cpu_count()} ({_cpu_model()})",
        f"- kernel: {platform.release()}",
        f"- python: {platform.python_version()} ({platform.python_implementation()})",
    ]
    lines += [f"- {tool}: {version}" for tool, version in tools.items()]
    return lines


def table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| workload | target | req/s | p50 | p99 | CPU µs/req | processor CPU µs/req | errors |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.workload} | {row.target} | {row.rps:,.0f} | {_latency(row.p50_us)} "
            f"| {_latency(row.p99_us)} | {row.cpu_us:.0f} | {row.processor_cpu_us:.0f} "
            f"| {row.errors()} |"
        )
    return lines


def matrix(
    rows: Sequence[Row],
    title: str,
    cell: str,
    floors: Sequence[Floor] = (),
    compared: Sequence[str] = (),
    columns: Sequence[str] = (),
) -> list[str]:
    """One line per workload, one column per target: the figure to compare at a glance.

    ``cell`` is a Row property: "cpu_us" or "rps". Targets (labels) come in the order of
    ``columns``, then of the rows. Each ``compared`` target that ran gets a column more: its
    value divided by the workload's floor (``floors``), beside the goal."""
    workloads = list(dict.fromkeys(row.workload for row in rows))
    ran = {row.target for row in rows}
    targets = list(dict.fromkeys([c for c in columns if c in ran] + [r.target for r in rows]))
    values = {(row.workload, row.target): getattr(row, cell) for row in rows}
    floor_of = {floor.workload: floor for floor in floors}
    ratioed = [target for target in compared if target in targets] if floors else []
    headers = targets + [f"{target} / floor" for target in ratioed]
    headers += ["goal"] if ratioed else []
    lines = [
        f"| {title} | " + " | ".join(headers) + " |",
        "|---|" + "---:|" * len(headers),
    ]
    for workload in workloads:
        cells = [
            f"{values[workload, target]:,.0f}" if (workload, target) in values else "-"
            for target in targets
        ]
        floor = floor_of.get(workload)
        for target in ratioed:
            pair = (workload, target), (workload, floor.target if floor else "")
            ratio = values[pair[0]] / values[pair[1]] if all(p in values for p in pair) else None
            cells.append("-" if ratio is None else f"{ratio:.2f}")
        if ratioed:
            cells.append(f"≤ {floor.goal:.2f}" if floor else "-")
        lines.append(f"| {workload} | " + " | ".join(cells) + " |")
    return lines


def render(
    rows: Sequence[Row],
    settings: list[str],
    tools: dict[str, str],
    notes: list[str],
    floors: Sequence[Floor] = (),
    compared: Sequence[str] = (),
    columns: Sequence[str] = (),
) -> str:
    """The report; ``floors`` and ``compared`` add ratio columns to the CPU table, ``columns``
    orders the targets (see `matrix`)."""
    parts = ["# extproc benchmark", "", *machine_lines(tools), *settings, ""]
    parts += matrix(rows, "CPU µs per request", "cpu_us", floors, compared, columns) + [""]
    parts += matrix(rows, "req/s", "rps", columns=columns) + [""]
    parts += table(rows)
    parts += ["", quietness_note(rows), *notes, ""]
    return "\n".join(parts)
