"""The soak (bench/soak.py), short: 25 s of 32 concurrent clients through a body-transforming
processor, every body checked end to end, the proxy's descriptors, threads and memory
compared before and after. ``make soak`` runs the long one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.proxy import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("mode", ["streamed", "buffered"])
def test_short_soak_loses_and_leaks_nothing(tmp_path: Path, mode: str) -> None:
    figures_path = tmp_path / "soak.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "soak.py"),
            "--duration",
            "25",
            "--warmup",
            "3",
            "--mode",
            mode,
            "--json",
            str(figures_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(figures_path.read_text())
    assert figures["requests"] > 0
    assert (figures["lost"], figures["corrupted"], figures["problems"]) == (0, 0, [])
