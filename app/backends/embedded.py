"""In-process generation with continuous (iteration-level) batching.

One background thread owns the model and runs a loop: admit waiting requests (prefill each alone, sample its
first token), then advance every active sequence by one token in a single batched forward pass. Sequences join
and leave between steps, so a new user never waits for another user's whole answer, and N users cost one
weight read per step instead of N (decoding a small model is memory-bound: that is where the speed-up is).

The batch's KV cache is the model's own ``DynamicCache`` kept *left-padded*: every row's newest token sits in
the same last column, so one forward step appends one column for all rows. A joining row is padded on the left
to the batch's length (or the batch to the row's), a leaving row is dropped with ``index_select`` and
all-padding leading columns are trimmed. Padding is masked through ``attention_mask`` and each row gets its own
``position_ids``, so the model code stays the library's (any causal LM with a full-attention ``DynamicCache``).
Prefill runs one request at a time (so greedy results do not depend on who else is being served: tested), and
decode is one batched step for everyone. transformers' paged ``generate_batch`` gave 30 tokens/s in total for 8
requests on these CPUs (DESIGN.md); this loop gave 76-90 tokens/s in total for 8 users and ~21 for one user on
2 pinned cores of an otherwise idle Xeon (same-shape model, ``python -m benchmarks.serve``), where a bare
``generate`` that serves nobody (fixed batch, no streaming, spinning OpenMP workers) gave ~117 and ~29.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

if "torch" not in sys.modules:
    # OpenMP workers that spin between ops steal the cores they share with Kafka, the UI and the event loop: on
    # this workplace's busy 2-core machines a batch-of-8 step was 5-10x slower with spinning (the default) than
    # with sleeping workers. Read once when torch loads; an explicit setting in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers.decoders import DecodeStream
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from app.backends.base import Busy, Chunk
from feedback.events import Sampling

log = logging.getLogger(__name__)

PREFILL_TOKEN_BUDGET = 512  # prompt tokens prefilled between two decode steps, so joins never stall a batch long


class _GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends into spare capacity instead of re-concatenating the whole cache every
    step (what ``DynamicLayer.update`` does): with 8 rows the copies would add ~10% to each step's memory traffic.
    ``keys`` / ``values`` stay views of the first ``n`` columns, so the rest of transformers sees a normal layer."""

    HEADROOM = 128

    def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        b, h, n, d = keys.shape
        self._kbuf = keys.new_empty(b, h, n + self.HEADROOM, d)
        self._vbuf = values.new_empty(b, h, n + self.HEADROOM, values.shape[-1])
        self._kbuf[:, :, :n] = keys
        self._vbuf[:, :, :n] = values
        self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.set(key_states, value_states)
            return self.keys, self.values
        n, m = self.keys.shape[-2], key_states.shape[-2]
        if n + m > self._kbuf.shape[-2]:
            self.set(self.keys, self.values)  # grows by HEADROOM columns
        self._kbuf[:, :, n : n + m] = key_states
        self._vbuf[:, :, n : n + m] = value_states
        self.keys, self.values = self._kbuf[:, :, : n + m], self._vbuf[:, :, : n + m]
        return self.keys, self.values


def _new_cache(config) -> DynamicCache:
    cache = DynamicCache(config=config)
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise NotImplementedError("the embedded backend batches full-attention caches only (no sliding window)")
    cache.layers = [_GrowingLayer() for _ in cache.layers]
    return cache


@dataclass(eq=False)
class _Request:
    ids: list[int]
    sampling: Sampling
    max_new: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    decoder: DecodeStream
    generator: torch.Generator | None
    completion: int = 0
    cancelled: bool = False
    done: bool = False


def _deliver(items: list[tuple[_Request, Chunk]]) -> None:
    for req, chunk in items:
        req.queue.put_nowait(chunk)


class EmbeddedBackend:
    """A causal LM loaded in this process, shared by up to ``max_concurrency`` concurrent streams.

    ``max_queue`` more requests may wait for a slot; past that ``stream`` raises ``Busy`` at once. Prompts are
    trimmed to ``max_context_tokens`` by dropping the oldest non-system messages.
    """

    def __init__(
        self,
        model_path: str | Path,
        max_concurrency: int = 8,
        max_queue: int = 16,
        max_context_tokens: int = 2048,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        num_threads: int | None = None,
    ):
        self.name = f"embedded:{model_path}"
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if self.device.type == "cpu":
            # Process-global. All cores for intra-op work: only the decode thread does heavy torch work, and on
            # 2 cores oversubscribing (more threads than cores) costs more than it gains.
            torch.set_num_threads(num_threads or len(os.sched_getaffinity(0)))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        cfg = self.model.config
        self.max_context_tokens = min(max_context_tokens, getattr(cfg, "max_position_embeddings", None) or 10**9)
        self._fast = self.tokenizer._tokenizer  # the Rust tokenizer, for incremental decoding
        self._stop_ids = self._find_stop_ids()

        self._cv = threading.Condition()
        self._pending: collections.deque[_Request] = collections.deque()
        self._inflight = 0  # admitted and not yet released: active rows + waiting requests
        self._closed = False
        # Batch state, touched only by the decode thread.
        self._rows: list[_Request] = []
        self._cache: DynamicCache | None = None
        self._pad: torch.Tensor | None = None  # (B,) left padding of each row
        self._next: torch.Tensor | None = None  # (B, 1) token each row feeds at the next step
        self._width = 0  # cache length in columns, padding included
        # Chunks of one step, handed to each event loop in one call: one wake-up per step, not one per stream.
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Chunk]]] = {}

        with torch.inference_mode():  # first-call kernel setup out of the first user's TTFT
            self.model(input_ids=torch.tensor([[self._stop_ids[0]] * 4], device=self.device), logits_to_keep=1)
        self._thread = threading.Thread(target=self._run, name="embedded-decode", daemon=True)
        self._thread.start()

    def _find_stop_ids(self) -> list[int]:
        ids: list[int] = []
        eos = self.model.generation_config.eos_token_id
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        for t in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
            tid = self.tokenizer.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.append(tid)
        return list(dict.fromkeys(ids))

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

    async def stream(self, messages: list[dict[str, str]], sampling: Sampling) -> AsyncIterator[Chunk]:
        ids = self.encode(messages)
        with self._cv:
            if self._closed:
                raise RuntimeError("backend is closed")
            if self._inflight >= self.max_concurrency + self.max_queue:
                raise Busy(f"{self._inflight} requests in flight (bound {self.max_concurrency}+{self.max_queue})")
            self._inflight += 1
        req = None
        try:  # from here on every path, a failing seed or setup included, gives the slot back in `finally`
            gen = None
            if sampling.temperature > 0:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8)) >> 1)
            req = _Request(
                ids=ids,
                sampling=sampling,
                max_new=max(1, min(sampling.max_new_tokens, self.max_context_tokens - len(ids))),
                loop=asyncio.get_running_loop(),
                queue=asyncio.Queue(),
                decoder=DecodeStream(skip_special_tokens=True),
                generator=gen,
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

    async def aclose(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        await asyncio.to_thread(self._thread.join, 30)

    # ---- decode thread ----

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._pending or self._rows or self._closed):
                        self._cv.wait()
                    if self._closed:
                        break
                    new: list[_Request] = []
                    budget = PREFILL_TOKEN_BUDGET
                    while self._pending and len(self._rows) + len(new) < self.max_concurrency:
                        if new and len(self._pending[0].ids) > budget:
                            break
                        req = self._pending.popleft()
                        new.append(req)
                        budget -= len(req.ids)
                try:
                    for req in new:
                        if not req.cancelled:
                            self._prefill(req)
                            self._flush()  # the first token goes out before the next prefill
                    self._drop([i for i, r in enumerate(self._rows) if not r.cancelled])
                    if self._rows:
                        self._step()
                except Exception:  # noqa: BLE001 - fail the affected streams, keep serving the next ones
                    log.exception("decode step failed")
                    for req in self._rows + new:
                        if not req.done:
                            req.done = True
                            self._send(req, Chunk("", finish_reason="error"))
                    self._rows, self._cache, self._pad, self._next, self._width = [], None, None, None, 0
                self._flush()
        for req in self._rows + list(self._pending):
            self._send(req, Chunk("", finish_reason="cancelled"))
        self._flush()

    def _send(self, req: _Request, chunk: Chunk) -> None:
        self._outbox.setdefault(req.loop, []).append((req, chunk))

    def _flush(self) -> None:
        for loop, items in self._outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is gone: nobody reads these streams any more
                for req, _ in items:
                    req.cancelled = True
        self._outbox = {}

    def _prefill(self, req: _Request) -> None:
        cache = _new_cache(self.model.config)
        ids = torch.tensor([req.ids], device=self.device)
        logits = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
        tok = self._sample(logits[:, -1], [req])[0]
        if self._emit(req, tok):
            return
        self._join(req, cache, tok)

    def _join(self, req: _Request, cache: DynamicCache, tok: int) -> None:
        n = len(req.ids)
        nxt = torch.tensor([[tok]], device=self.device)
        if self._cache is None:
            self._cache, self._width = cache, n
            self._pad = torch.zeros(1, dtype=torch.long, device=self.device)
            self._next = nxt
            self._rows = [req]
            return
        if n > self._width:  # the batch grows on the left to the newcomer's length
            grow = n - self._width
            for layer in self._cache.layers:
                layer.set(F.pad(layer.keys, (0, 0, grow, 0)), F.pad(layer.values, (0, 0, grow, 0)))
            self._pad += grow
            self._width = n
        shift = self._width - n
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.set(
                torch.cat([mine.keys, F.pad(theirs.keys, (0, 0, shift, 0))]),
                torch.cat([mine.values, F.pad(theirs.values, (0, 0, shift, 0))]),
            )
        self._pad = torch.cat([self._pad, torch.tensor([shift], device=self.device)])
        self._next = torch.cat([self._next, nxt])
        self._rows.append(req)

    def _drop(self, keep: list[int]) -> None:
        """Keep only rows ``keep``; trim leading columns that are padding in every remaining row."""
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._pad, self._next, self._width = [], None, None, None, 0
            return
        idx = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        self._pad = self._pad[idx]
        self._next = self._next[idx]
        cut = int(self._pad.min())
        for layer in self._cache.layers:
            layer.set(layer.keys[idx, :, cut:], layer.values[idx, :, cut:])
        self._pad -= cut
        self._width -= cut

    def _step(self) -> None:
        cols = torch.arange(self._width + 1, device=self.device)
        mask = (cols[None, :] >= self._pad[:, None]).long()
        positions = (self._width - self._pad)[:, None]
        logits = self.model(
            input_ids=self._next,
            attention_mask=mask,
            position_ids=positions,
            cache=self._cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        self._width += 1
        toks = self._sample(logits[:, -1], self._rows)
        keep = [i for i, (req, tok) in enumerate(zip(self._rows, toks, strict=True)) if not self._emit(req, tok)]
        self._next = torch.tensor(toks, device=self.device)[:, None]
        self._drop(keep)

    def _sample(self, logits: torch.Tensor, reqs: list[_Request]) -> list[int]:
        toks = logits.argmax(-1).tolist()
        for i, req in enumerate(reqs):
            s = req.sampling
            if s.temperature > 0:
                probs = torch.softmax(logits[i].float() / s.temperature, -1)
                if s.top_p < 1.0:
                    sorted_p, order = probs.sort(descending=True)
                    outside = sorted_p.cumsum(0) - sorted_p > s.top_p  # keep the smallest set reaching top_p
                    sorted_p[outside] = 0.0
                    toks[i] = int(order[torch.multinomial(sorted_p, 1, generator=req.generator)])
                else:
                    toks[i] = int(torch.multinomial(probs, 1, generator=req.generator))
        return toks

    def _emit(self, req: _Request, tok: int) -> bool:
        """Send ``tok``'s text to the consumer; True when the request is finished (or nobody listens)."""
        if req.cancelled:
            return True
        req.completion += 1
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
        self._send(req, Chunk(text, finish_reason=reason, prompt_tokens=len(req.ids), completion_tokens=req.completion))
        return True
