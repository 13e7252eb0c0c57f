"""extproc.io.systemd with the environment patched and real sockets (gunicorn's approach)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from extproc.io import systemd


@pytest.fixture
def datagram(tmp_path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(10)
        yield sock


def test_notify_sends_the_state_to_the_socket_path(datagram: socket.socket) -> None:
    with mock.patch.dict(os.environ, {"NOTIFY_SOCKET": datagram.getsockname()}):
        assert systemd.notify("READY=1")
    assert datagram.recv(4096) == b"READY=1"


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"extproc-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        with mock.patch.dict(os.environ, {"NOTIFY_SOCKET": "@" + name}):
            assert systemd.notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize("value", [None, "", "relative/path"], ids=["unset", "empty", "relative"])
def test_notify_is_a_no_op_without_a_usable_socket(value: str | None) -> None:
    env = {} if value is None else {"NOTIFY_SOCKET": value}
    with mock.patch.dict(os.environ, env, clear=True):
        assert not systemd.notify("READY=1")


def test_notify_to_a_socket_nobody_listens_on_is_not_an_error(tmp_path: Path) -> None:
    with mock.patch.dict(os.environ, {"NOTIFY_SOCKET": str(tmp_path / "gone")}):
        assert not systemd.notify("READY=1")


def test_reloading_state_carries_the_monotonic_clock(datagram: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    state = systemd.reloading_state()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = state.split("\n")
    assert first == "RELOADING=1"
    assert second.startswith("MONOTONIC_USEC=")
    assert before <= int(second.removeprefix("MONOTONIC_USEC=")) <= after


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "OURS"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
    ],
    ids=["unset", "zero", "garbage", "set", "our_pid", "other_pid"],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    env: dict[str, str], expected: float | None
) -> None:
    env = {k: str(os.getpid()) if v == "OURS" else v for k, v in env.items()}
    with mock.patch.dict(os.environ, env, clear=True):
        assert systemd.watchdog_interval() == expected


def _at(fd: int, sock: socket.socket) -> None:
    """Put ``sock`` at descriptor ``fd``, as systemd does from 3 on."""
    os.dup2(sock.fileno(), fd)


@pytest.fixture
def passed_socket() -> Iterator[socket.socket]:
    """A listening socket at the first free descriptor from 3 up (usually not 3 itself under
    pytest), standing in for what systemd passes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock


def test_listen_fds_trusts_our_own_pid_and_unsets_the_variables(
    passed_socket: socket.socket,
) -> None:
    first = systemd.SD_LISTEN_FDS_START
    # Descriptors 3 and 4 may be the test run's: borrow them and put them back afterwards.
    saved = {fd: _save(fd) for fd in (first, first + 1)}
    try:
        _at(first, passed_socket)
        _at(first + 1, passed_socket)
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
        with mock.patch.dict(os.environ, env):
            assert systemd.listen_fds() == [first, first + 1]
            assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)
        # Close-on-exec: a process the proxy starts does not get the listener.
        assert not os.get_inheritable(first) and not os.get_inheritable(first + 1)
        with socket.socket(fileno=os.dup(first)) as taken:
            assert taken.getsockname() == passed_socket.getsockname()
    finally:
        for fd, (copy, inheritable) in saved.items():
            if copy is None:
                os.close(fd)
            else:
                os.dup2(copy, fd, inheritable=inheritable)
                os.close(copy)


def _save(fd: int) -> tuple[int | None, bool]:
    try:
        return os.dup(fd), os.get_inheritable(fd)
    except OSError:
        return None, False


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_PID": "1", "LISTEN_FDS": "1"},
        {"LISTEN_FDS": "1"},
        {"LISTEN_PID": "OURS", "LISTEN_FDS": "many"},
        {"LISTEN_PID": "OURS", "LISTEN_FDS": "0"},
    ],
    ids=["unset", "other_pid", "no_pid", "garbage_count", "zero"],
)
def test_listen_fds_is_empty_when_the_sockets_are_not_ours(env: dict[str, str]) -> None:
    env = {k: str(os.getpid()) if v == "OURS" else v for k, v in env.items()}
    with mock.patch.dict(os.environ, env, clear=True):
        assert systemd.listen_fds() == []
        # Unset all the same: a child must not take them as its own either.
        assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ


def test_listen_fds_can_leave_the_variables() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    with mock.patch.dict(os.environ, env, clear=True):
        assert systemd.listen_fds(unset_environment=False) == []
        assert os.environ["LISTEN_FDS"] == "1"
