"""Child processes the benchmark owns: start, wait until they serve, measure CPU, stop.

Everything here is bounded in time and acts only on PIDs this harness started (and their
descendants, found through /proc), never on process names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

STOP_TIMEOUT_S = 5.0
START_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 30
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class StartError(RuntimeError):
    """A target did not come up (its log tail is in the message)."""


def free_port() -> int:
    """A loopback port nobody listens on right now (a small race we accept on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    """Direct children of every thread of `pid` (each thread lists the ones it forked)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                found.extend(int(child) for child in text.split())
    return found


def process_tree(pid: int) -> list[int]:
    """`pid` and all its live descendants."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def _cpu_ticks(pid: int) -> int:
    """utime + stime of one process; the kernel sums all its threads, live and exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0  # exited between listing and reading: its time is lost, not worth failing
    # The command name may contain spaces; the fields we want follow its closing paren.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def _start_time(pid: int) -> int | None:
    """When `pid` started (ticks since boot): tells our process from a later one reusing it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22 of proc(5)


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by `pid` and its live descendants."""
    return sum(_cpu_ticks(p) for p in process_tree(pid)) / _CLOCK_TICKS


def system_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (user+nice+system+irq+softirq+steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def own_cpu_seconds() -> float:
    """This process plus its reaped children (each finished wrk run lands here)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def http_get(
    port: int, path: str = "/", timeout: float = 5.0, method: str = "GET", body: bytes = b""
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body or None)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _pin(cpus: frozenset[int] | None) -> Callable[[], None] | None:
    """A preexec_fn pinning the child to ``cpus`` (as `taskset -c` would) before it runs, so
    every thread it starts inherits the mask."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


class Proc:
    """One started process, its log file and its listening port; ``cpus`` pins it (and its
    children) to those CPUs, where None leaves it this process's affinity."""

    def __init__(
        self,
        name: str,
        command: list[str],
        port: int,
        log_path: Path,
        env: dict[str, str],
        cpus: frozenset[int] | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self._popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_pin(cpus),
        )

    @property
    def pid(self) -> int:
        return self._popen.pid

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def wait_listening(self, timeout: float = START_TIMEOUT_S) -> None:
        """Return once the port accepts connections; fail early if the process died."""
        deadline = time.monotonic() + timeout
        while True:
            code = self._popen.poll()
            if code is not None:
                raise StartError(f"{self.name} exited with {code} while starting\n{self.tail()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            if time.monotonic() > deadline:
                raise StartError(f"{self.name} not listening after {timeout:.0f} s\n{self.tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a timeout; then any descendant left behind. Idempotent."""
        descendants = [(p, _start_time(p)) for p in process_tree(self.pid)[1:]]
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait(STOP_TIMEOUT_S)
        # nginx workers outlive a SIGKILLed master; they were ours, so reap them by PID.
        for pid, started in descendants:
            if started is not None and _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log for {self.name})"
        body = "\n".join(text.splitlines()[-lines:])
        return f"--- {self.name} log ({self.log_path}) ---\n{body}"


@dataclasses.dataclass(frozen=True)
class CpuReading:
    """CPU seconds so far, split into what we measure and what tells us the machine was quiet."""

    target: float
    processor: float
    ours: float  # every process of the benchmark: harness, wrk, nginx, processor, target
    system: float  # all cores, every process
    wall: float

    def minus(self, earlier: CpuReading) -> CpuReading:
        return CpuReading(
            *(now - then for now, then in zip(self.values(), earlier.values(), strict=True))
        )

    def values(self) -> tuple[float, float, float, float, float]:
        return (self.target, self.processor, self.ours, self.system, self.wall)

    @property
    def others(self) -> float:
        """CPU burnt by processes outside the benchmark (other jobs sharing the machine)."""
        return max(0.0, self.system - self.ours)


def read_cpu(target: Proc, processor: Proc, upstream: Proc) -> CpuReading:
    target_s, processor_s = target.cpu_seconds(), processor.cpu_seconds()
    upstream_s = 0.0 if upstream is target else upstream.cpu_seconds()
    return CpuReading(
        target=target_s,
        processor=processor_s,
        ours=target_s + processor_s + upstream_s + own_cpu_seconds(),
        system=system_busy_seconds(),
        wall=time.monotonic(),
    )


def _status_kib(pid: int, key: str) -> int:
    """One ``Key:   123 kB`` line of /proc/PID/status (the whole process, all threads), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {key} line")


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` right now (VmRSS)."""
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss_bytes(pid: int) -> int:
    """The kernel's high-water mark of `pid`'s resident memory (VmHWM), since start or reset."""
    return _status_kib(pid, "VmHWM") * 1024


def reset_peak_rss(pid: int) -> bool:
    """Restart VmHWM from the current RSS (proc(5) clear_refs "5"); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def open_files_limit(pid: int) -> str:
    """`pid`'s soft/hard RLIMIT_NOFILE as /proc/PID/limits shows them, e.g. "1024/4096"."""
    try:
        text = Path(f"/proc/{pid}/limits").read_text()
    except OSError:
        return "?"
    for line in text.splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return f"{soft}/{hard}"
    return "?"
