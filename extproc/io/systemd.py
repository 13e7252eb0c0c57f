"""systemd integration: readiness notifications and socket activation, standard library only.

:func:`notify` sends one sd_notify(3) datagram to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for
an abstract socket) and does nothing outside systemd. :func:`listen_fds` takes the sockets
systemd passed (sd_listen_fds(3)): ``LISTEN_FDS`` counts them from fd 3, and is trusted only
when ``LISTEN_PID`` is this process, because the variables are inherited by children that did
not get the sockets. Both read the environment when called, never at import.
"""

from __future__ import annotations

import os
import socket
import time

SD_LISTEN_FDS_START = 3
_ENV_LISTEN = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def notify(state: str) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``, lines joined by ``\\n``) to the service
    manager; False when there is none or the datagram could not be sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "@/":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        # The manager is gone or its socket refuses us: a notification is never worth a crash.
        return False
    return True


def reloading_state() -> str:
    """``RELOADING=1`` with the ``MONOTONIC_USEC`` that Type=notify-reload requires."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None when the
    watchdog is off or is meant for another process (``$WATCHDOG_PID``)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0 or (pid is not None and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


def listen_fds(unset_environment: bool = True) -> list[int]:
    """The descriptors systemd passed to this process (3, 4, ...), marked close-on-exec; an
    empty list when there are none or they were meant for another process. The variables are
    removed afterwards (``unset_environment``), so children do not take the sockets as theirs."""
    try:
        if os.environ.get("LISTEN_PID") != str(os.getpid()):
            return []
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    finally:
        if unset_environment:
            for name in _ENV_LISTEN:
                os.environ.pop(name, None)
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(count, 0)))
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds
