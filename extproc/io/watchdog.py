"""One thread that runs callbacks at deadlines: message timeouts and deferred stream closes.

A blocking gRPC read cannot be given a timeout (grpc/grpc#20562 for the stub; a segregated
call's ``next_event`` takes none either), so a late reply is cut short by cancelling the call
from here. One thread serves every stream of a client: none is started per message.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable


class Timer:
    __slots__ = ("deadline", "callback", "cancelled")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False


class Watchdog:
    """Runs callbacks at deadlines on one thread, started on first use."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def arm(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, callback)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="extproc-watchdog", daemon=True
                )
                self._thread.start()
            heapq.heappush(self._heap, (timer.deadline, next(self._counter), timer))
            if self._heap[0][2] is timer:
                self._cond.notify()
        return timer

    @staticmethod
    def disarm(timer: Timer) -> None:
        # Left in the heap and skipped when due: cheaper than removing it now.
        timer.cancelled = True

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=5)

    def _run(self) -> None:
        heap = self._heap
        with self._cond:
            while not self._stopped:
                # Nearly every timer is disarmed by its reply long before it is due: drop
                # those at the top now, so the thread wakes only for a live deadline, not
                # once per message.
                while heap and heap[0][2].cancelled:
                    heapq.heappop(heap)
                if not heap:
                    self._cond.wait()
                    continue
                delay = heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(heap)[2].callback()
