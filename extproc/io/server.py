"""The proxy server: a listening socket, a bounded pool of worker threads, keep-alive parking.

A worker owns a connection only while a request is on it. A new connection, a keep-alive
connection between requests, and one whose request head has not all arrived, is parked in the
acceptor's selector (gunicorn's gthread model), so idle and slow clients do not pin worker
threads; it goes to a worker when readable and is closed once past its deadline (the request
head timeout, or the idle timeout between requests). Beyond ``max_connections`` open client
connections, a new one is closed as soon as it is accepted (Envoy's listener connection limit).
Stopping closes the listener and the parked connections, then lets in-flight requests finish
within the drain timeout. The admin listener, if any, serves from the start of serving to the
end of the drain, so /ready says DRAINING while requests finish.

Signals (SIGTERM, SIGINT, SIGHUP) are only queued by :meth:`ProxyServer.queue_signal`; the
acceptor loop acts on them. A reload builds the new configuration whole and swaps it in for
requests that start afterwards; what the old one alone used (a processor channel, an upstream
pool) is closed once every connection job that began before the swap has ended. The loop also
tells systemd (or, in a worker, the supervisor) READY, RELOADING, STOPPING and WATCHDOG.
"""

from __future__ import annotations

import contextlib
import contextvars
import queue
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import FrameType

import structlog

from extproc.addresses import Address, InheritedSocket
from extproc.config import ProcessorSettings, ProxyConfig, check_reloadable
from extproc.errors import ConfigError
from extproc.io import systemd
from extproc.io.admin import AdminServer
from extproc.io.clients import Client, open_client
from extproc.io.driver import ConnectionHandler, Downstream, Generation
from extproc.io.tls import TlsConnection, handshake, pending
from extproc.io.upstream import UpstreamPool
from extproc.metrics import Stats

log = structlog.get_logger("extproc.server")

_SWEEP_INTERVAL = 1.0
# Out of file descriptors: stop listening this long rather than spin on a readable listener.
_ACCEPT_BACKOFF = 0.1


def open_listener(listen: Address | InheritedSocket) -> socket.socket:
    """The listening socket ``listen`` names: bound here, or taken over from a descriptor."""
    if isinstance(listen, InheritedSocket):
        return adopt(listen.fd)
    return bind(listen)


def adopt(fd: int, backlog: int = 1024) -> socket.socket:
    """A TCP socket inherited open (systemd socket activation, ``fd://N``); OSError with the
    ``fd://N`` as filename when it is not one."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as err:
        raise OSError(err.errno, err.strerror, f"fd://{fd}") from err
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise OSError(0, "not a TCP socket", f"fd://{fd}")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        # Bound by whoever passed it but not yet listening (systemd's sockets already are).
        sock.listen(backlog)
    return sock


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


ConfigLoader = Callable[[], ProxyConfig]
Notifier = Callable[[str], object]


class ProxyServer:
    """One proxy process's listener, workers, upstream pool and processor channels.

    ``load_config`` builds the configuration afresh for a reload (SIGHUP); without one a
    reload keeps the configuration. ``notify`` receives the sd_notify states (systemd's by
    default; a worker's goes to its supervisor). ``control``, in a worker, is its end of the
    supervisor's channel: asked for stats, the loop answers with them; when the supervisor is
    gone, the worker stops.
    """

    def __init__(
        self,
        config: ProxyConfig,
        listener: socket.socket | None = None,
        *,
        load_config: ConfigLoader | None = None,
        notify: Notifier = systemd.notify,
        control: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.stats = Stats(config.filter.stat_prefix)
        # Both sockets first: a taken address then fails before anything else is started.
        self._listener = listener if listener is not None else open_listener(config.listen)
        self.admin: AdminServer | None = None
        if config.admin is not None:
            try:
                self.admin = AdminServer(config.admin, self.stats, lambda: self.state)
            except OSError as err:
                self._listener.close()
                # The address as the filename: the CLI names the listener that failed.
                raise OSError(err.errno, err.strerror, str(config.admin)) from err
        self._load_config = load_config
        self._notify = notify
        self._control = control
        self.pool = UpstreamPool(config.upstream, self.stats)
        # One channel per processor target: the filter's, and any a route overrides it with.
        self.processors = _clients(config, {})
        self.handler = ConnectionHandler(config, self.pool, self.processors, self.stats)
        self._listener.setblocking(False)
        # Worker threads log with the context of the thread that built the server (a worker
        # process's index): a new thread starts with an empty one.
        self._executor = ThreadPoolExecutor(
            config.threads,
            thread_name_prefix="extproc-worker",
            initializer=_adopt_context,
            initargs=(contextvars.copy_context(),),
        )
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._returned: queue.SimpleQueue[Downstream] = queue.SimpleQueue()
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._parked: dict[int, tuple[Downstream, float]] = {}
        self._stop = threading.Event()
        self._serving = threading.Event()
        self._idle = threading.Condition()
        # Connection jobs in flight, by the reload generation current when each was submitted.
        self._inflight: dict[int, int] = {}
        self._generation = 0
        # (generation, close): run close once no job submitted before that generation is left.
        self._retiring: list[tuple[int, Callable[[], None]]] = []
        # Client connections open (parked or on a worker), for --max-connections.
        self._open = 0
        self._open_lock = threading.Lock()
        self._accept_paused_until: float | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no worker holds a connection; whether that happened within ``timeout``
        (tests and embedding hosts check with it that nothing is left in flight)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._inflight, timeout)

    @property
    def in_flight(self) -> int:
        """Connections a worker thread is serving right now."""
        with self._idle:
            return sum(self._inflight.values())

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
        self._wake()

    def queue_signal(self, signum: int) -> None:
        """For a signal handler: SIGTERM/SIGINT stop, SIGHUP reloads, in the acceptor loop."""
        self._signals.put(signum)
        self._wake()

    def _wake(self) -> None:
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
        log.info(
            "listening",
            address=f"{host}:{port}",
            tls=self.config.tls is not None,
            upstream=",".join(str(a) for a in self.config.upstream.addresses),
            processor=self.config.filter.processor.target,
            threads=self.config.threads,
        )
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        if self._control is not None:
            self._selector.register(self._control, selectors.EVENT_READ)
        # LIVE first: the admin listener never answers /ready with a state already past.
        self._serving.set()
        if self.admin is not None:
            self.admin.start()
        self._notify("READY=1")
        try:
            self._loop()
        finally:
            self._notify("STOPPING=1")
            self._shutdown()

    def _loop(self) -> None:
        now = time.monotonic()
        next_sweep = now + _SWEEP_INTERVAL
        ping_every = systemd.watchdog_interval() if self._control is None else None
        next_ping = now if ping_every is not None else None
        while not self._stop.is_set():
            timeout = _SWEEP_INTERVAL
            if self._accept_paused_until is not None:
                timeout = max(0.0, min(timeout, self._accept_paused_until - time.monotonic()))
            if next_ping is not None:
                timeout = max(0.0, min(timeout, next_ping - time.monotonic()))
            for key, _ in self._selector.select(timeout=timeout):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj is self._wake_r:
                    self._take_returned()
                    self._take_signals()
                elif key.fileobj is self._control:
                    self._answer_control()
                else:
                    self._unpark(key.fd)
            now = time.monotonic()
            if self._accept_paused_until is not None and now >= self._accept_paused_until:
                self._accept_paused_until = None
                self._selector.register(self._listener, selectors.EVENT_READ)
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + _SWEEP_INTERVAL
            if next_ping is not None and ping_every is not None and now >= next_ping:
                # From this loop only: a stuck loop stops the pings and systemd restarts us.
                self._notify("WATCHDOG=1")
                next_ping = now + ping_every

    def _take_signals(self) -> None:
        while not self._signals.empty():
            signum = self._signals.get()
            if signum == signal.SIGHUP:
                self.reload()
            else:
                log.info("stop_requested", signal=signal.Signals(signum).name)
                self.request_stop()

    def _answer_control(self) -> None:
        assert self._control is not None
        try:
            message = self._control.recv(64)
        except OSError:
            message = b""
        if not message:
            log.warning("supervisor_gone")
            self._selector.unregister(self._control)
            self.request_stop()
        elif message == b"stats":
            with contextlib.suppress(OSError):
                self._control.send(b"stats\n" + self.stats.exposition())

    def reload(self) -> bool:
        """Build the configuration afresh and use it for requests that start from now on;
        a configuration that fails is refused, naming the field, and the running one kept."""
        self._notify(systemd.reloading_state())
        try:
            if self._load_config is not None:
                config = self._load_config()
                check_reloadable(self.config, config)
                self._apply(config)
        except ConfigError as err:
            self.stats.reload_failures.inc()
            log.error("reload_failed", field=err.option, reason=err.message)
            return False
        except Exception as err:
            # A reload must never take the serving process down with it.
            self.stats.reload_failures.inc()
            log.exception("reload_failed", field=None, reason=repr(err))
            return False
        else:
            self.stats.reloads.inc()
            log.info("reloaded", processor=self.config.filter.processor.target)
            return True
        finally:
            self._notify("READY=1")

    def _apply(self, config: ProxyConfig) -> None:
        old_pool, old_processors = self.pool, self.processors
        pool = (
            old_pool
            if config.upstream == old_pool.settings
            else UpstreamPool(config.upstream, self.stats)
        )
        processors = _clients(config, old_processors)
        self.handler.swap(Generation.build(config, pool, processors))
        self.config, self.pool, self.processors = config, pool, processors
        closes = [c.close for s, c in old_processors.items() if processors.get(s) is not c]
        if pool is not old_pool:
            closes.append(old_pool.close)
        with self._idle:
            self._generation += 1
            self._retiring += [(self._generation, close) for close in closes]
            ready = self._ready_to_close()
        for close in ready:
            close()

    def _ready_to_close(self) -> list[Callable[[], None]]:
        """Under ``_idle``: take the closes whose generation no job in flight predates."""
        oldest = min(self._inflight, default=self._generation)
        ready = [close for gen, close in self._retiring if gen <= oldest]
        self._retiring = [(gen, close) for gen, close in self._retiring if gen > oldest]
        return ready

    def _shutdown(self) -> None:
        self._selector.close()
        self._listener.close()
        for down, _ in self._parked.values():
            down.conn.close()
            self._closed()
        self._parked.clear()
        deadline = time.monotonic() + self.config.timeouts.drain
        with self._idle:
            while self._inflight and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            unfinished = sum(self._inflight.values())
            retiring, self._retiring = self._retiring, []
        self._executor.shutdown(wait=unfinished == 0, cancel_futures=True)
        while not self._returned.empty():
            self._returned.get().conn.close()
            self._closed()
        self._wake_r.close()
        self._wake_w.close()
        self.pool.close()
        for client in self.processors.values():
            client.close()
        for _, close in retiring:
            close()
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
            limit = self.config.max_connections
            if limit and self._open >= limit:
                # Envoy's listener limit: refused at once, before any byte is read. Counted
                # before the close, so a client that saw the close also sees the count.
                self.stats.downstream_cx_overflow.inc()
                sock.close()
                continue
            sock.setblocking(True)
            down = Downstream.accept(sock, peer, self.config.max_request_head_bytes)
            with self._open_lock:
                self._open += 1
            self.stats.connection_opened()
            # A new connection waits in the selector too, so a client that connects and sends
            # nothing costs no worker thread; its whole head is due by the header timeout.
            down.head_deadline = time.monotonic() + self.config.timeouts.request_headers
            self._park(down, down.head_deadline)

    def _submit(self, down: Downstream) -> None:
        with self._idle:
            generation = self._generation
            self._inflight[generation] = self._inflight.get(generation, 0) + 1
        self._executor.submit(self._work, down, generation)

    def _work(self, down: Downstream, generation: int) -> None:
        ready: list[Callable[[], None]] = []
        try:
            keep = self._handshake(down) and self.handler.serve(down, self._may_linger)
        except Exception:
            log.exception("worker_error")
            down.conn.close()
            keep = False
        finally:
            with self._idle:
                left = self._inflight[generation] - 1
                if left:
                    self._inflight[generation] = left
                else:
                    del self._inflight[generation]
                    if self._retiring:
                        ready = self._ready_to_close()
                self._idle.notify_all()
        for close in ready:
            close()
        if keep:
            self._returned.put(down)
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")
        else:
            self._closed()  # serve() or the except above closed it

    def _closed(self) -> None:
        with self._open_lock:
            self._open -= 1
        self.stats.connection_closed()

    def _may_linger(self) -> bool:
        # Half the pool stays free for connections the acceptor hands over meanwhile.
        return self.in_flight <= self.config.threads // 2 and not self._stop.is_set()

    def _handshake(self, down: Downstream) -> bool:
        """TLS first, on this worker thread, for a listener with TLS; whether to serve."""
        tls = self.config.tls
        if tls is None or isinstance(down.conn, TlsConnection):
            return True
        deadline = time.monotonic() + self.config.timeouts.request_headers
        try:
            down.conn = handshake(
                tls.context, down.conn, deadline, self.config.max_request_head_bytes
            )
        except OSError as err:
            log.info("tls_handshake_failed", peer=down.peer_ip, error=str(err))
            return False
        return True

    def _take_returned(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        idle_deadline = time.monotonic() + self.config.timeouts.idle
        while not self._returned.empty():
            down = self._returned.get()
            if pending(down.conn):
                self._submit(down)  # bytes in the TLS layer: the selector would not see them
            else:
                # A head begun but incomplete keeps its own deadline; otherwise keep-alive.
                self._park(down, down.head_deadline or idle_deadline)

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
            self.handler.head_timed_out(down)
            down.conn.close()
            self._closed()


def install_signals(queue_signal: Callable[[int], None], *more: signal.Signals) -> None:
    """SIGTERM, SIGINT, SIGHUP (and ``more``) handlers that only queue the signal: logging
    and the rest happen in the loop that takes it."""

    def handler(signum: int, frame: FrameType | None) -> None:
        queue_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, *more):
        signal.signal(signum, handler)


def _adopt_context(context: contextvars.Context) -> None:
    for var, value in context.items():
        var.set(value)


def _clients(
    config: ProxyConfig, running: Mapping[ProcessorSettings, Client]
) -> dict[ProcessorSettings, Client]:
    """A client per processor target of ``config``, reusing the running ones that match."""
    return {
        settings: running.get(settings) or open_client(settings, max_streams=config.threads)
        for settings in config.filter.processors()
    }
