"""Continuous batching shared by the in-process engines: admission, the slot bound, streaming, cancellation.

Every in-process engine (transformers in ``embedded.py``, llama.cpp in ``llamacpp.py``) serves many streams from
one decode thread that owns the model, and sequences join and leave between steps. What differs between engines
is only how one iteration advances the batch; what must not differ is the contract the app relies on: ``Busy``
past ``max_concurrency + max_queue``, a slot freed the moment its consumer goes away, prompts built by the model's
own chat template, stop tokens and streamed text decoded the same way, and one event-loop wake-up per step rather
than one per stream. So that contract lives here once, and an engine implements ``_iterate`` (admit, advance,
emit) and ``_reset`` (forget the batch after a failed step).

Who goes next is fair across parties (``party``: an API key, a browser user): a free slot goes to the waiting
request whose party has the lowest virtual token counter (``app.vtc``), and the engine charges each party the
prompt tokens it computes (``_charge_prefill``) and the tokens it generates (``_emit``) as it goes. The app's
admission gate orders by the same ``counters``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tokenizers.decoders import DecodeStream

from app.backends.base import Busy, Chunk
from app.vtc import TokenCounters
from feedback.events import Sampling

log = logging.getLogger(__name__)

_EXTRA_STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>")


@dataclass(eq=False)
class Request:
    """One stream from admission to its last chunk. ``slot``/``fed``/``last`` belong to the engine."""

    ids: list[int]
    sampling: Sampling
    max_new: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    decoder: DecodeStream
    rng: Any  # the engine's seeded generator (sampling only), None for greedy
    scope: str | None = None  # whose cached prefixes this request may reuse (engines with a prefix cache)
    party: str = ""  # whose virtual token counter this request is charged to and ordered by
    seq: int = 0  # arrival order, among requests of equal counters
    completion: int = 0
    cancelled: bool = False
    done: bool = False
    slot: int = -1  # engine: which cache row / sequence id holds this request
    fed: int = 0  # engine: tokens of this request already in the cache
    last: int = -1  # engine: the sampled token the next step feeds
    extra: dict = field(default_factory=dict)


def stop_ids(tokenizer, eos: int | list[int] | None) -> list[int]:
    """Token ids that end an answer: the generation config's eos, the tokenizer's, and the usual chat ends."""
    ids: list[int] = []
    ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    for t in _EXTRA_STOP_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.append(tid)
    return list(dict.fromkeys(ids))


def _deliver(items: list[tuple[Request, Chunk]]) -> None:
    for req, chunk in items:
        req.queue.put_nowait(chunk)


class BatchingBackend:
    """The consumer side and the decode thread's skeleton. Subclasses load a model, then call ``_start``.

    ``max_queue`` more requests may wait for a slot; past that ``stream`` raises ``Busy`` at once. Prompts are
    trimmed to ``max_context_tokens`` by dropping the oldest non-system messages.
    """

    #: prompt tokens admitted per iteration when an engine prefills whole prompts (None: admit while slots last)
    prefill_budget: int | None = None

    def _setup(
        self, name: str, tokenizer, eos: int | list[int] | None, max_concurrency: int, max_queue: int, context: int
    ) -> None:
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("max_concurrency must be >= 1 and max_queue >= 0")
        self.name = name
        self.tokenizer = tokenizer
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.max_context_tokens = context
        self._fast = tokenizer._tokenizer  # the Rust tokenizer, for incremental decoding
        self._stop_ids = stop_ids(tokenizer, eos)
        self._cv = threading.Condition()
        self._pending: collections.deque[Request] = collections.deque()
        self._inflight = 0  # admitted and not yet released: active rows + waiting requests
        self._arrivals = 0
        self.counters = TokenCounters()  # tokens served per party; the app's admission gate shares them
        self._closed = False
        self._rows: list[Request] = []  # admitted to the batch; touched only by the decode thread
        # Chunks of one step, handed to each event loop in one call: one wake-up per step, not one per stream.
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Request, Chunk]]] = {}

    def _start(self) -> None:
        """Start the decode thread; returns once its ``_warm_up`` is done (and raises what it raised).

        The warm-up runs on the decode thread, not the caller's: an OpenMP runtime (llama.cpp's, torch's) keeps a
        team of worker threads for every thread that ever ran a parallel region. A second team idling beside the
        decode thread's makes libgomp count more threads than cores and stop spinning at its barriers, and
        llama.cpp's ~100 barriers a token then cost a sleep and a wake each: 27 ms a token instead of 16 here.
        """
        ready = threading.Event()
        failed: list[BaseException] = []

        def main() -> None:
            try:
                self._warm_up()
            except BaseException as e:  # noqa: BLE001 - handed to the constructor's thread below
                failed.append(e)
                ready.set()
                self._shutdown()
                return
            ready.set()
            self._run()

        self._thread = threading.Thread(target=main, name=f"{type(self).__name__}-decode", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]

    # ---- engine hooks ----

    def _new_rng(self, seed: int) -> Any:
        raise NotImplementedError

    def _iterate(self, new: list[Request]) -> None:
        """Admit ``new``, drop cancelled rows, advance the batch by one step and ``_emit`` what it produced."""
        raise NotImplementedError

    def _reset(self) -> None:
        """Forget the whole batch (after a failed step); every row has been told already."""
        raise NotImplementedError

    def _warm_up(self) -> None:
        """First-call setup kept out of the first user's TTFT; runs on the decode thread before it serves."""

    def _shutdown(self) -> None:
        """Free engine resources; runs on the decode thread after its loop ends."""

    # ---- consumer side (event loop) ----

    def load(self) -> float:
        return min(1.0, self._inflight / self.max_concurrency)

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat-template token ids, dropping the oldest non-system messages until the prompt fits."""
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        limit = self.max_context_tokens - 1
        while True:
            ids = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            if len(ids) <= limit:
                return ids
            drop = next((i for i, m in enumerate(msgs[:-1]) if m["role"] != "system"), None)
            if drop is None:
                raise ValueError(f"the message is {len(ids)} tokens; this model takes at most {limit}")
            del msgs[drop]

    async def stream(
        self,
        messages: list[dict[str, str]],
        sampling: Sampling,
        cache_scope: str | None = None,
        party: str | None = None,
    ) -> AsyncIterator[Chunk]:
        ids = self.encode(messages)
        party = party if party is not None else cache_scope or ""
        with self._cv:
            if self._closed:
                raise RuntimeError("backend is closed")
            if self._inflight >= self.max_concurrency + self.max_queue:
                raise Busy(f"{self._inflight} requests in flight (bound {self.max_concurrency}+{self.max_queue})")
            self._inflight += 1
            self._arrivals += 1
            seq = self._arrivals
        self.counters.enter(party)
        req = None
        try:  # from here on every path, a seed the engine rejects included, gives the slot back in `finally`
            rng = None
            if sampling.temperature > 0:
                seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8)) >> 1
                rng = self._new_rng(seed)
            req = Request(
                ids=ids,
                sampling=sampling,
                max_new=max(1, min(sampling.max_new_tokens, self.max_context_tokens - len(ids))),
                loop=asyncio.get_running_loop(),
                queue=asyncio.Queue(),
                decoder=DecodeStream(skip_special_tokens=True),
                rng=rng,
                scope=cache_scope,
                party=party,
                seq=seq,
            )
            with self._cv:
                self._pending.append(req)
                self._cv.notify()
            while True:
                chunk = await req.queue.get()
                if chunk.finish_reason is not None:
                    req.done = True
                yield chunk
                if req.done:
                    return
        finally:
            with self._cv:
                self._inflight -= 1
                if req is not None:
                    req.cancelled = True  # the decode thread drops the row before its next step
                    try:
                        self._pending.remove(req)
                    except ValueError:
                        pass
            self.counters.exit(party)

    async def aclose(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        await asyncio.to_thread(self._thread.join, 30)

    # ---- decode thread ----

    def _take_pending(self) -> list[Request]:
        """Under the lock: the waiting requests that fit in free slots (and the prefill budget, if any), the one
        whose party has the lowest counter first."""
        new: list[Request] = []
        budget = self.prefill_budget
        while self._pending and len(self._rows) + len(new) < self.max_concurrency:
            nxt = min(self._pending, key=self._order)
            if budget is not None:
                if new and len(nxt.ids) > budget:
                    break
                budget -= len(nxt.ids)
            self._pending.remove(nxt)
            new.append(nxt)
        return new

    def _order(self, req: Request) -> tuple[float, int]:
        """Fair order: the party served least first, then the oldest."""
        return self.counters.counter(req.party), req.seq

    def _charge_prefill(self, req: Request, tokens: int) -> None:
        """``tokens`` of ``req``'s prompt were computed (not taken from a cache): its party pays for them."""
        self.counters.charge(req.party, prefill=tokens)

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._pending or self._rows or self._closed):
                        self._cv.wait()
                    if self._closed:
                        break
                    new = self._take_pending()
                try:
                    self._iterate(new)
                except Exception:  # noqa: BLE001 - fail the affected streams, keep serving the next ones
                    log.exception("decode step failed")
                    for req in self._rows + new:
                        if not req.done:
                            req.done = True
                            self._send(req, Chunk("", finish_reason="error"))
                    self._rows = []
                    self._reset()
                self._flush()
            for req in self._rows + list(self._pending):
                self._send(req, Chunk("", finish_reason="cancelled"))
            self._flush()
        finally:
            self._shutdown()

    def _send(self, req: Request, chunk: Chunk) -> None:
        self._outbox.setdefault(req.loop, []).append((req, chunk))

    def _flush(self) -> None:
        for loop, items in self._outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is gone: nobody reads these streams any more
                for req, _ in items:
                    req.cancelled = True
        self._outbox = {}

    def _emit(self, req: Request, tok: int) -> bool:
        """Send ``tok``'s text to the consumer; True when the request is finished (or nobody listens)."""
        if req.cancelled:
            return True
        req.completion += 1
        self.counters.charge(req.party, decode=1)
        reason = None
        text = ""
        if tok in self._stop_ids:
            reason = "stop"
        else:
            text = req.decoder.step(self._fast, tok) or ""
            if req.completion >= req.max_new:
                reason = "length"
        if reason is None:
            if text:
                self._send(req, Chunk(text))
            return False
        req.done = True
        self._send(
            req,
            Chunk(
                text,
                finish_reason=reason,
                prompt_tokens=len(req.ids),
                completion_tokens=req.completion,
                cached_tokens=req.extra.get("cached"),
            ),
        )
        return True
