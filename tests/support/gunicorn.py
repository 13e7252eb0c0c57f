"""gunicorn in a subprocess on 127.0.0.1:0, with sync workers: tests.support.wsgi_app, or any
app gunicorn can name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


@contextmanager
def running_gunicorn(
    env: dict[str, str], workers: int = 1, app: str = "tests.support.wsgi_app:application"
) -> Iterator[tuple[str, int]]:
    """``gunicorn --preload APP`` with ``workers`` sync workers; its address once all booted."""
    gunicorn = Path(sys.executable).with_name("gunicorn")
    if not gunicorn.exists():
        pytest.fail("gunicorn is not installed in the test venv (setup.cfg dev extras)")
    command = [
        str(gunicorn),
        "--preload",
        "--workers",
        str(workers),
        "--worker-class",
        "sync",
        "--bind",
        "127.0.0.1:0",
        "--chdir",
        str(REPO),
        app,
    ]
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env},
    ) as server:
        stdout = server.stdout
        assert stdout is not None
        lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in stdout:
                lines.append(line)
                text = "".join(lines)
                if "Listening at" in text and text.count("Booting worker") >= workers:
                    ready.set()
            ready.set()  # gunicorn exited: its output says why

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            ready.wait(START_TIMEOUT_S)
            match = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", "".join(lines))
            assert match, "".join(lines)
            yield "127.0.0.1", int(match[1])
        finally:
            server.terminate()
            server.wait(STOP_TIMEOUT_S)
            reader.join(STOP_TIMEOUT_S)
