"""Fair admission to a backend's generation slots: who waits least when the model is full.

A backend's own queue is first come, first served, so one party that sends many requests (many API keys, a
script) fills it and everyone else's first token waits behind all of them (measured: a quiet user's TTFT p99 went
from 3.5 s to 74 s under ``benchmarks.hostile``). ``FairGate`` sits in front of each backend: at most ``capacity``
answers are in progress, and when a slot frees, the waiter whose party (``bucket``: an API key, a browser user)
has the lowest virtual token counter (``app.vtc``: weighted tokens served) goes next; among equals the one with
fewer answers in progress, then the oldest. A party that has used less than a flooder therefore goes ahead of the
flooder's whole queue, however many requests that queue holds. Past ``max_waiting`` waiters a request is refused at
once (``Busy``).

The counters are the backend's own when it charges tokens as its engine computes them (``backend.counters``), so
the gate and the engine's queue order by the same numbers; otherwise the gate keeps its own and the service charges
each answer's usage when it ends.

The gate is shared by every event loop of the process (the API's and any other): its state is guarded by a
thread lock and a grant reaches its waiter through ``call_soon_threadsafe``. Every grant is paired with exactly
one ``release``, including a waiter cancelled while its grant was in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass, field

from app.backends.base import Busy
from app.vtc import TokenCounters


@dataclass(eq=False)
class _Waiter:
    bucket: str
    seq: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(repr=False)


class FairGate:
    def __init__(self, capacity: int, max_waiting: int, counters: TokenCounters | None = None):
        self.capacity = max(1, capacity)
        self.max_waiting = max(0, max_waiting)
        self.counters = counters if counters is not None else TokenCounters()
        self._active: dict[str, int] = {}
        self._total = 0
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()
        self._mu = threading.Lock()

    def in_use(self) -> int:
        with self._mu:
            return self._total

    def waiting(self) -> int:
        with self._mu:
            return len(self._waiters)

    async def acquire(self, bucket: str) -> None:
        """Wait for a slot (fairly); ``Busy`` at once when too many already wait. Pair with ``release``."""
        loop = asyncio.get_running_loop()
        with self._mu:
            if self._total < self.capacity and not self._waiters:
                self.counters.enter(bucket)
                self._take(bucket)
                return
            if len(self._waiters) >= self.max_waiting:
                raise Busy(f"{self._total} answers in progress and {len(self._waiters)} waiting")
            self.counters.enter(bucket)
            waiter = _Waiter(bucket, next(self._seq), loop, loop.create_future())
            self._waiters.append(waiter)
        try:
            await waiter.future
        except BaseException:
            with self._mu:
                granted = waiter not in self._waiters
                if not granted:
                    self._waiters.remove(waiter)
                    self.counters.exit(bucket)
            if granted and waiter.future.done() and not waiter.future.cancelled():
                self.release(bucket)  # the grant landed before the cancellation did: give it back
            # granted but not yet delivered: _deliver sees the cancelled future and gives it back
            raise

    def release(self, bucket: str) -> None:
        with self._mu:
            self._untake(bucket)
            self.counters.exit(bucket)
            self._grant()

    def _take(self, bucket: str) -> None:
        self._active[bucket] = self._active.get(bucket, 0) + 1
        self._total += 1

    def _untake(self, bucket: str) -> None:
        n = self._active.get(bucket, 0) - 1
        if n > 0:
            self._active[bucket] = n
        else:
            self._active.pop(bucket, None)
        self._total -= 1

    def _grant(self) -> None:
        while self._total < self.capacity and self._waiters:
            w = min(
                self._waiters, key=lambda x: (self.counters.counter(x.bucket), self._active.get(x.bucket, 0), x.seq)
            )
            self._waiters.remove(w)
            self._take(w.bucket)
            try:
                w.loop.call_soon_threadsafe(self._deliver, w)
            except RuntimeError:  # that event loop is closed: nobody will take this slot
                self._untake(w.bucket)
                self.counters.exit(w.bucket)

    def _deliver(self, w: _Waiter) -> None:
        if w.future.done():  # cancelled while the grant was on its way
            self.release(w.bucket)
        else:
            w.future.set_result(None)
