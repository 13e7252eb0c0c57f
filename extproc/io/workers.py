"""``--workers N``: a supervisor process and N forked workers accepting on one shared socket.

The supervisor binds (or inherits) the listening socket, then forks the workers; each builds
its own :class:`~extproc.io.server.ProxyServer` (thread pool, upstream pool, gRPC channels)
after the fork, so no gRPC state crosses it, and accepts on the inherited socket. A shared
socket rather than SO_REUSEPORT: a socket systemd passes is one socket, the connections queued
on it outlive a worker that dies, and whichever worker is free takes the next one.

The supervisor runs no proxy code. Its loop, like gunicorn's arbiter, acts on signals its
handlers only queue: SIGHUP checks the new configuration and forwards SIGHUP to every worker,
SIGTERM/SIGINT forward SIGTERM and wait for the workers to drain, SIGCHLD reaps a dead worker
and forks its replacement, after a delay that doubles while workers keep dying young. It
serves the admin listener, summing the workers' stats (:meth:`Stats.sum_workers`), and talks
to systemd for all of them.

Each worker has a SOCK_SEQPACKET pair to the supervisor: the worker sends its sd_notify states
(READY=1 ...) and its stats when asked (``stats``); the supervisor learns readiness from it,
and a worker whose supervisor is gone sees the end of it and stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import selectors
import signal
import socket
import threading
import time
from collections.abc import Iterator

import structlog

from extproc.config import ProxyConfig, check_reloadable
from extproc.errors import ConfigError
from extproc.io import systemd
from extproc.io.admin import AdminServer
from extproc.io.server import ConfigLoader, Notifier, ProxyServer, install_signals
from extproc.metrics import Stats

log = structlog.get_logger("extproc.workers")

# A worker that dies younger than this counts as failing: the next replacement waits longer.
_HEALTHY_AFTER = 10.0
_FIRST_BACKOFF = 0.1
_MAX_BACKOFF = 10.0
# How long the admin listener waits for a worker's stats before showing the sum without them.
_STATS_TIMEOUT = 2.0
# After the drain timeout, how long workers get to exit before SIGKILL.
_EXIT_GRACE = 5.0
_TICK = 1.0
_STATS_REPLY = b"stats\n"
_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


def pin_to_cpu(index: int) -> int:
    """Pin this process to CPU ``index`` mod the CPUs it may use; the CPU. Threads started
    afterwards inherit the mask, so call it before starting any."""
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[index % len(cpus)]
    os.sched_setaffinity(0, {cpu})
    return cpu


@dataclasses.dataclass(eq=False)
class _Worker:
    index: int
    pid: int
    control: socket.socket
    started: float
    ready: bool = False
    replies: queue.SimpleQueue[bytes] = dataclasses.field(default_factory=queue.SimpleQueue)


class Supervisor:
    """Forks ``count`` workers serving ``config`` on ``listener`` and keeps them running."""

    def __init__(
        self,
        config: ProxyConfig,
        listener: socket.socket,
        count: int,
        *,
        load_config: ConfigLoader | None = None,
        cpu_affinity: bool = False,
        notify: Notifier = systemd.notify,
    ) -> None:
        self.config = config
        self.count = count
        self._listener = listener
        self._load_config = load_config
        self._cpu_affinity = cpu_affinity
        self._notify = notify
        self.stats = Stats(config.filter.stat_prefix)
        self.stats.sum_workers(self._collect_stats)
        self.admin: AdminServer | None = None
        if config.admin is not None:
            try:
                self.admin = AdminServer(config.admin, self.stats, lambda: self.state)
            except OSError as err:
                raise OSError(err.errno, err.strerror, str(config.admin)) from err
        self._workers: dict[int, _Worker] = {}
        self._failures = [0] * count
        self._respawn_at: dict[int, float] = {}
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._stats_lock = threading.Lock()
        self._stopping = False
        self._announced = False
        self._reload_pending: set[int] = set()
        self._reloading = False

    @property
    def state(self) -> str:
        if self._stopping:
            return "DRAINING"
        return "LIVE" if any(w.ready for w in list(self._workers.values())) else "INITIALIZING"

    def _healthy(self) -> bool:
        """Whether to ping systemd's watchdog: announced ready, not stopping, and some worker
        serving (while none is, systemd may as well restart the whole service)."""
        return self._announced and self.state == "LIVE"

    def queue_signal(self, signum: int) -> None:
        """For a signal handler: queue the signal for the loop and wake it."""
        self._signals.put(signum)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # The loop -----------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT and the workers' drain (this process's main loop)."""
        install_signals(self.queue_signal, signal.SIGCHLD)
        host, port = self._listener.getsockname()[:2]
        log.info("supervisor_started", address=f"{host}:{port}", workers=self.count)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        for index in range(self.count):
            self._spawn(index)
        if self.admin is not None:
            self.admin.start()
        ping_every = systemd.watchdog_interval()
        next_ping = time.monotonic()
        deadline: float | None = None
        try:
            while self._workers or not self._stopping:
                now = time.monotonic()
                if ping_every is not None and now >= next_ping and self._healthy():
                    self._notify("WATCHDOG=1")
                    next_ping = now + ping_every
                if self._stopping and deadline is None:
                    deadline = now + self.config.timeouts.drain + _EXIT_GRACE
                if deadline is not None and now >= deadline:
                    self._kill_all(signal.SIGKILL)
                self._wait(min([now + _TICK, next_ping, *self._respawn_at.values()]) - now)
                self._reap()
                self._respawn_due()
        finally:
            self._close()

    def _wait(self, timeout: float) -> None:
        for key, _ in self._selector.select(max(0.0, timeout)):
            if key.fileobj is self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
                self._take_signals()
            else:
                self._from_worker(key.data)

    def _take_signals(self) -> None:
        while not self._signals.empty():
            signum = self._signals.get()
            if signum == signal.SIGHUP:
                self._reload()
            elif signum in (signal.SIGTERM, signal.SIGINT) and not self._stopping:
                log.info("stop_requested", signal=signal.Signals(signum).name)
                self._stopping = True
                self._respawn_at.clear()
                self._notify("STOPPING=1")
                # The workers close their copies as they stop: new clients are refused
                # (or, when systemd holds the socket, wait in it for the next start).
                self._listener.close()
                self._kill_all(signal.SIGTERM)

    def _close(self) -> None:
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
        self._listener.close()
        if self.admin is not None:
            self.admin.stop()
        log.info("supervisor_stopped")

    # Workers ------------------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as err:
            self._spawn_failed(index, err)
            return
        # Held back across the fork: a signal the child got before it installs its own handlers
        # would run the supervisor's copy there and be lost (a SIGTERM, say).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            pid = os.fork()
        except OSError as err:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            ours.close()
            theirs.close()
            self._spawn_failed(index, err)
            return
        if pid == 0:
            ours.close()
            code = 1
            try:
                code = self._worker_main(index, theirs)
            except BaseException:
                log.exception("worker_failed", index=index)
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
        worker = _Worker(index, pid, ours, time.monotonic())
        self._workers[pid] = worker
        self._selector.register(ours, selectors.EVENT_READ, worker)
        log.info("worker_started", index=index, pid=pid)

    def _spawn_failed(self, index: int, err: OSError) -> None:
        """Out of processes or descriptors: try again later, as for a worker that died young."""
        failures = self._failures[index] = self._failures[index] + 1
        delay = min(_MAX_BACKOFF, _FIRST_BACKOFF * 2 ** (failures - 1))
        self._respawn_at[index] = time.monotonic() + delay
        log.error("worker_fork_failed", index=index, error=str(err), retry_in=delay)

    def _worker_main(self, index: int, control: socket.socket) -> int:
        """In the forked child: drop what is the supervisor's, then serve until told to stop."""
        for signum in _HANDLED:
            signal.signal(signum, signal.SIG_DFL)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
        for other in self._workers.values():
            other.control.close()
        if self.admin is not None:
            self.admin.close_inherited()
        # Every line the worker logs says which worker it is.
        structlog.contextvars.bind_contextvars(worker=index)
        if self._cpu_affinity:
            log.info("cpu_pinned", cpu=pin_to_cpu(index))
        load = self._load_config

        def load_for_worker() -> ProxyConfig:
            assert load is not None
            return dataclasses.replace(load(), admin=None)  # the supervisor serves it

        def to_supervisor(state: str) -> None:
            with contextlib.suppress(OSError):
                control.send(state.encode())

        server = ProxyServer(
            dataclasses.replace(self.config, admin=None),
            self._listener,
            load_config=load_for_worker if load is not None else None,
            notify=to_supervisor,
            control=control,
        )
        install_signals(server.queue_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)  # what came meanwhile, now
        server.serve_forever()
        return 0

    def _from_worker(self, worker: _Worker) -> None:
        try:
            message = worker.control.recv(1 << 20)
        except OSError:
            message = b""
        if not message:  # the worker is gone; _reap replaces it
            self._selector.unregister(worker.control)
            return
        if message.startswith(_STATS_REPLY):
            worker.replies.put(message[len(_STATS_REPLY) :])
        elif message == b"READY=1":
            worker.ready = True
            self._reload_pending.discard(worker.pid)
            self._announce()

    def _announce(self) -> None:
        """READY=1 to systemd once every worker accepts, and once every worker has reloaded."""
        ready = sum(w.ready for w in self._workers.values())
        if not self._announced and ready == self.count:
            self._announced = True
            log.info("workers_ready", workers=ready)
            self._notify("READY=1")
        elif self._announced and not self._reload_pending and self._reloading:
            self._reloading = False
            self._notify("READY=1")

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self._workers.pop(pid, None)
            if worker is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(worker.control)
            worker.control.close()
            self._reload_pending.discard(pid)
            self._announce()
            self._exited(worker, status)

    def _exited(self, worker: _Worker, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        how = {"signal": signal.Signals(-code).name} if code < 0 else {"exit_code": code}
        if self._stopping:
            log.info("worker_stopped", index=worker.index, pid=worker.pid, **how)
            return
        lived = time.monotonic() - worker.started
        failures = self._failures[worker.index] + 1 if lived < _HEALTHY_AFTER else 0
        self._failures[worker.index] = failures
        delay = min(_MAX_BACKOFF, _FIRST_BACKOFF * 2 ** (failures - 1)) if failures else 0.0
        self._respawn_at[worker.index] = time.monotonic() + delay
        self.stats.worker_restarts.inc()
        log.warning("worker_died", index=worker.index, pid=worker.pid, restart_in=delay, **how)

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for index, when in sorted(self._respawn_at.items()):
            if when <= now:
                del self._respawn_at[index]
                self._spawn(index)

    def _kill_all(self, signum: int) -> None:
        for pid in list(self._workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # Reload and stats ---------------------------------------------------------------------

    def _reload(self) -> None:
        """Check the new configuration here, once, then have every worker load it."""
        if self._stopping:
            return
        self._notify(systemd.reloading_state())
        try:
            if self._load_config is not None:
                config = self._load_config()
                check_reloadable(self.config, config)
                self.config = config  # what replacement workers start with
        except ConfigError as err:
            self.stats.reload_failures.inc()
            log.error("reload_failed", field=err.option, reason=err.message)
            self._notify("READY=1")
            return
        except Exception as err:
            # A reload must never take the supervisor down with it.
            self.stats.reload_failures.inc()
            log.exception("reload_failed", field=None, reason=repr(err))
            self._notify("READY=1")
            return
        self.stats.reloads.inc()
        log.info("reloading_workers", workers=len(self._workers))
        self._reloading = True
        self._reload_pending = set(self._workers)
        self._kill_all(signal.SIGHUP)
        self._announce()

    def _collect_stats(self) -> Iterator[str]:
        """Each ready worker's stats as Prometheus text (admin thread); a worker that does not
        answer in time is left out of the sum."""
        with self._stats_lock:
            workers = [w for w in list(self._workers.values()) if w.ready]
            asked = []
            for worker in workers:
                while not worker.replies.empty():
                    worker.replies.get()  # a late answer to an earlier scrape
                with contextlib.suppress(OSError):
                    worker.control.send(b"stats")
                    asked.append(worker)
            deadline = time.monotonic() + _STATS_TIMEOUT
            texts = []
            for worker in asked:
                try:
                    reply = worker.replies.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    log.warning("worker_stats_missing", index=worker.index, pid=worker.pid)
                    continue
                texts.append(reply.decode())
        return iter(texts)
