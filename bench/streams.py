"""The processor stream alone: client CPU per Process stream, for each client.

    .venv/bin/python bench/streams.py [--streams 4000] [--concurrency 16] [--repeat 5]
                                      [--processor cpp|python]

For one and for two messages a stream (request headers; then response headers too), runs
`benchkit.stream_client` for each client in turn (direct, stub, floor, interleaved, --repeat
times), each in a fresh process pinned to CPU 0 with the processor on CPU 1, and prints the
median CPU µs per stream of the client process, [min-max] over the repetitions. Exits 2 when
the C++ processor is not built (`make bench-tools`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchkit import targets

CLIENTS = ("direct", "stub", "floor")
LABELS = {
    "direct": "extproc direct",
    "stub": "extproc stub",
    "floor": "floor (bench/benchkit/floor_stream.py)",
}


def _one(client: str, port: int, args: argparse.Namespace, messages: int) -> float:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(targets.BENCH_DIR), str(targets.REPO_ROOT)])
    command = [sys.executable, "-m", "benchkit.stream_client", client, str(port)]
    command += [str(args.streams), str(args.concurrency), str(messages)]
    done = subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {0}),
    )
    return float(json.loads(done.stdout)["cpu_us"])


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--processor", choices=("cpp", "python"), default="cpp")
    args = parser.parse_args(argv)
    if args.processor == "cpp" and not targets.CPP_PROCESSOR_BIN.exists():
        print("bench: the C++ processor is not built: run `make bench-tools`", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {1})  # the processor inherits CPU 1; each client gets CPU 0
    figures: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="extproc-streams-") as tmp:
        processor = targets.start_processor(Path(tmp), args.processor)
        try:
            for _ in range(args.repeat):
                for messages in (1, 2):
                    for client in CLIENTS:
                        cpu = _one(client, processor.port, args, messages)
                        figures.setdefault((client, messages), []).append(cpu)
                        print(f"  {client} {messages}: {cpu:.0f} µs", file=sys.stderr)
        finally:
            processor.stop()
    print(
        f"Client CPU µs per stream, {args.concurrency} streams at once, {args.streams} streams "
        f"a run, {args.repeat} runs; client on CPU 0, {args.processor} processor on CPU 1\n"
    )
    print("| client | one message | two messages |\n|---|---:|---:|")
    for client in CLIENTS:
        cells = []
        for messages in (1, 2):
            values = figures[(client, messages)]
            low, high = min(values), max(values)
            cells.append(f"{statistics.median(values):,.0f} [{low:,.0f}-{high:,.0f}]")
        print(f"| {LABELS[client]} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
