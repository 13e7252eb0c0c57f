"""The proxy server: a listening socket, a bounded pool of worker threads, keep-alive parking.

A worker owns a connection only while a request is on it. A new connection, and a keep-alive
connection between requests, is parked in the acceptor's selector (gunicorn's gthread model),
so idle clients do not pin worker threads; it goes to a worker when readable and is closed once
idle too long.
Stopping closes the listener and the parked connections, then lets in-flight requests finish
within the drain timeout. The admin listener, if any, serves from the start of serving to the
end of the drain, so /ready says DRAINING while requests finish.
"""

from __future__ import annotations

import contextlib
import queue
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import structlog

from extproc.config import Address, ProxyConfig
from extproc.io.admin import AdminServer
from extproc.io.driver import ConnectionHandler, Downstream
from extproc.io.processor import ProcessorClient
from extproc.io.upstream import UpstreamPool
from extproc.metrics import Stats

log = structlog.get_logger("extproc.server")

_SWEEP_INTERVAL = 1.0
# Out of file descriptors: stop listening this long rather than spin on a readable listener.
_ACCEPT_BACKOFF = 0.1


def bind(address: Address, backlog: int = 1024) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class ProxyServer:
    """One proxy process's listener, workers, upstream pool and processor channel."""

    def __init__(self, config: ProxyConfig, listener: socket.socket | None = None) -> None:
        self.config = config
        self.stats = Stats(config.stat_prefix)
        # Both sockets first: a taken address then fails before anything else is started.
        self._listener = listener if listener is not None else bind(config.listen)
        self.admin: AdminServer | None = None
        if config.admin is not None:
            try:
                self.admin = AdminServer(config.admin, self.stats, lambda: self.state)
            except OSError as err:
                self._listener.close()
                # The address as the filename: the CLI names the listener that failed.
                raise OSError(err.errno, err.strerror, str(config.admin)) from err
        self.pool = UpstreamPool(config.upstream)
        # One channel per processor target: the filter's, and any a route overrides it with.
        self.processors = {
            settings: ProcessorClient(settings, max_streams=config.threads)
            for settings in config.processors()
        }
        self.handler = ConnectionHandler(config, self.pool, self.processors, self.stats)
        self._listener.setblocking(False)
        self._executor = ThreadPoolExecutor(config.threads, thread_name_prefix="extproc-worker")
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._returned: queue.SimpleQueue[Downstream] = queue.SimpleQueue()
        self._parked: dict[int, tuple[Downstream, float]] = {}
        self._stop = threading.Event()
        self._serving = threading.Event()
        self._idle = threading.Condition()
        self._inflight = 0
        self._accept_paused_until: float | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    @property
    def in_flight(self) -> int:
        """Connections a worker thread is serving right now."""
        with self._idle:
            return self._inflight

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no worker thread is serving a connection; False after ``timeout``."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    @property
    def state(self) -> str:
        """The server state as Envoy names it (its /ready answers 200 only when LIVE)."""
        if self._stop.is_set():
            return "DRAINING"
        return "LIVE" if self._serving.is_set() else "INITIALIZING"

    # Lifecycle --------------------------------------------------------------------------

    def start(self) -> ProxyServer:
        """Serve on a background thread (embedding, tests)."""
        self._thread = threading.Thread(target=self.serve_forever, name="extproc-acceptor")
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Ask the acceptor loop to stop; safe from a signal handler."""
        self._stop.set()
        self.handler.draining.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def stop(self) -> None:
        """Stop accepting, drain in-flight requests, release everything. Idempotent."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def serve_forever(self) -> None:
        host, port = self.address
        upstream = self.config.upstream
        log.info(
            "listening",
            address=f"{host}:{port}",
            upstream=f"{upstream.host}:{upstream.port}",
            processor=self.config.processor.target,
            threads=self.config.threads,
        )
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        # LIVE first: the admin listener never answers /ready with a state already past.
        self._serving.set()
        if self.admin is not None:
            self.admin.start()
        try:
            self._loop()
        finally:
            self._shutdown()

    def _loop(self) -> None:
        next_sweep = time.monotonic() + _SWEEP_INTERVAL
        while not self._stop.is_set():
            timeout = _SWEEP_INTERVAL
            if self._accept_paused_until is not None:
                timeout = max(0.0, min(timeout, self._accept_paused_until - time.monotonic()))
            for key, _ in self._selector.select(timeout=timeout):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj is self._wake_r:
                    self._take_returned()
                else:
                    self._unpark(key.fd)
            now = time.monotonic()
            if self._accept_paused_until is not None and now >= self._accept_paused_until:
                self._accept_paused_until = None
                self._selector.register(self._listener, selectors.EVENT_READ)
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + _SWEEP_INTERVAL

    def _shutdown(self) -> None:
        self._selector.close()
        self._listener.close()
        for down, _ in self._parked.values():
            down.conn.close()
            self.stats.connection_closed()
        self._parked.clear()
        deadline = time.monotonic() + self.config.timeouts.drain
        with self._idle:
            while self._inflight and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            unfinished = self._inflight
        self._executor.shutdown(wait=unfinished == 0, cancel_futures=True)
        while not self._returned.empty():
            self._returned.get().conn.close()
            self.stats.connection_closed()
        self._wake_r.close()
        self._wake_w.close()
        self.pool.close()
        for client in self.processors.values():
            client.close()
        if self.admin is not None:
            self.admin.stop()
        log.info("stopped", unfinished_requests=unfinished)

    # Connections ------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                # EMFILE and friends: the listener stays readable, so stop watching it for a
                # moment and keep serving the connections we have.
                log.warning("accept_failed", error=str(err), retry_in=_ACCEPT_BACKOFF)
                self._selector.unregister(self._listener)
                self._accept_paused_until = time.monotonic() + _ACCEPT_BACKOFF
                return
            sock.setblocking(True)
            down = Downstream.accept(sock, peer, self.config.max_request_head_bytes)
            self.stats.connection_opened()
            # A new connection waits in the selector too, so a client that connects and sends
            # nothing costs no worker thread; it is dropped after the header read timeout.
            self._park(down, time.monotonic() + self.config.timeouts.request_headers)

    def _submit(self, down: Downstream) -> None:
        with self._idle:
            self._inflight += 1
        self._executor.submit(self._work, down)

    def _work(self, down: Downstream) -> None:
        try:
            keep = self.handler.serve(down)
        except Exception:
            log.exception("worker_error")
            down.conn.close()
            keep = False
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()
        if keep:
            self._returned.put(down)
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")
        else:
            self.stats.connection_closed()  # serve() or the except above closed it

    def _take_returned(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        deadline = time.monotonic() + self.config.timeouts.idle
        while not self._returned.empty():
            self._park(self._returned.get(), deadline)

    def _park(self, down: Downstream, deadline: float) -> None:
        sock = down.conn.sock
        self._parked[sock.fileno()] = (down, deadline)
        self._selector.register(sock, selectors.EVENT_READ)

    def _unpark(self, fd: int) -> None:
        down, _ = self._parked.pop(fd)
        self._selector.unregister(down.conn.sock)
        self._submit(down)

    def _sweep(self, now: float) -> None:
        expired = [fd for fd, (_, deadline) in self._parked.items() if deadline <= now]
        for fd in expired:
            down, _ = self._parked.pop(fd)
            self._selector.unregister(down.conn.sock)
            down.conn.close()
            self.stats.connection_closed()
