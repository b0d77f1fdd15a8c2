"""Fair admission to a backend's generation slots: who waits least when the model is full.

A backend's own queue is first come, first served, so one party that sends many requests (many API keys, a
script) fills it and everyone else's first token waits behind all of them (measured: a quiet user's TTFT p99 went
from 3.5 s to 74 s under ``benchmarks.hostile``). ``FairGate`` sits in front of each backend: at most ``capacity``
answers are in progress, and when a slot frees, the waiter whose party (``bucket``: an API key, a browser user)
has the fewest answers in progress goes next, oldest first among equals. A party with nothing running therefore
jumps every queue a flooding party built. Past ``max_waiting`` waiters a request is refused at once (``Busy``).

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


@dataclass(eq=False)
class _Waiter:
    bucket: str
    seq: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(repr=False)


class FairGate:
    def __init__(self, capacity: int, max_waiting: int):
        self.capacity = max(1, capacity)
        self.max_waiting = max(0, max_waiting)
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
                self._take(bucket)
                return
            if len(self._waiters) >= self.max_waiting:
                raise Busy(f"{self._total} answers in progress and {len(self._waiters)} waiting")
            waiter = _Waiter(bucket, next(self._seq), loop, loop.create_future())
            self._waiters.append(waiter)
        try:
            await waiter.future
        except BaseException:
            with self._mu:
                granted = waiter not in self._waiters
                if not granted:
                    self._waiters.remove(waiter)
            if granted and waiter.future.done() and not waiter.future.cancelled():
                self.release(bucket)  # the grant landed before the cancellation did: give it back
            # granted but not yet delivered: _deliver sees the cancelled future and gives it back
            raise

    def release(self, bucket: str) -> None:
        with self._mu:
            n = self._active.get(bucket, 0) - 1
            if n > 0:
                self._active[bucket] = n
            else:
                self._active.pop(bucket, None)
            self._total -= 1
            self._grant()

    def _take(self, bucket: str) -> None:
        self._active[bucket] = self._active.get(bucket, 0) + 1
        self._total += 1

    def _grant(self) -> None:
        while self._total < self.capacity and self._waiters:
            w = min(self._waiters, key=lambda x: (self._active.get(x.bucket, 0), x.seq))
            self._waiters.remove(w)
            self._take(w.bucket)
            try:
                w.loop.call_soon_threadsafe(self._deliver, w)
            except RuntimeError:  # that event loop is closed: nobody will take this slot
                n = self._active[w.bucket] - 1
                self._active[w.bucket] = n
                if not n:
                    del self._active[w.bucket]
                self._total -= 1

    def _deliver(self, w: _Waiter) -> None:
        if w.future.done():  # cancelled while the grant was on its way
            self.release(w.bucket)
        else:
            w.future.set_result(None)
