"""bin/extproc-proxy in a process of its own, for what must not share the test's process
(an environment such as GRPC_XDS_BOOTSTRAP, which gRPC reads once per process)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import IO

from tests.support.proxy import REPO

BIN = str(REPO / "bin" / "extproc-proxy")
_START_TIMEOUT = 30.0


def _collect(stream: IO[str], sink: list[str], ready: threading.Event) -> None:
    for line in stream:
        sink.append(line)
        if '"listening"' in line:
            ready.set()
    ready.set()  # the process ended: the waiter finds no address


@contextmanager
def proxy_process(*args: str, env: Mapping[str, str] = {}) -> Iterator[tuple[str, int]]:
    """Run ``extproc-proxy --listen 127.0.0.1:0 ARGS``; yields its address once it listens."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **env}
    proc = subprocess.Popen(
        [BIN, "--listen", "127.0.0.1:0", "--log-format", "json", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )
    lines: list[str] = []
    ready = threading.Event()
    assert proc.stderr is not None
    reader = threading.Thread(target=_collect, args=(proc.stderr, lines, ready), daemon=True)
    reader.start()
    try:
        ready.wait(_START_TIMEOUT)
        listening = [json.loads(line) for line in lines if '"listening"' in line]
        assert listening, "extproc-proxy did not start:\n" + "".join(lines)
        host, port = listening[0]["address"].rsplit(":", 1)
        yield host, int(port)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        reader.join(10)
        proc.stderr.close()
