"""In-process generation on transformers with continuous (iteration-level) batching: the fp32 reference engine
(``FLYWHEEL_SERVE_ENGINE=transformers``) and the one for CUDA; on CPU llama.cpp serves by default (``llamacpp.py``).

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

import logging
import os
import sys
from pathlib import Path

if "torch" not in sys.modules:
    # OpenMP workers that spin between ops steal the cores they share with Kafka, the UI and the event loop: on
    # this workplace's busy 2-core machines a batch-of-8 step was 5-10x slower with spinning (the default) than
    # with sleeping workers. Read once when torch loads; an explicit setting in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from app.backends.batching import BatchingBackend, Request

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


class EmbeddedBackend(BatchingBackend):
    """A causal LM loaded in this process with transformers, shared by up to ``max_concurrency`` streams.

    The fp32 reference engine (and the one for CUDA); ``llamacpp.LlamaCppBackend`` is the faster CPU engine.
    """

    prefill_budget = PREFILL_TOKEN_BUDGET

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
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if self.device.type == "cpu":
            # Process-global. All cores for intra-op work: only the decode thread does heavy torch work, and on
            # 2 cores oversubscribing (more threads than cores) costs more than it gains.
            torch.set_num_threads(num_threads or len(os.sched_getaffinity(0)))
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        cfg = self.model.config
        context = min(max_context_tokens, getattr(cfg, "max_position_embeddings", None) or 10**9)
        eos = self.model.generation_config.eos_token_id
        self._setup(f"embedded:{model_path}", tokenizer, eos, max_concurrency, max_queue, context)
        # Batch state, touched only by the decode thread.
        self._cache: DynamicCache | None = None
        self._pad: torch.Tensor | None = None  # (B,) left padding of each row
        self._next: torch.Tensor | None = None  # (B, 1) token each row feeds at the next step
        self._width = 0  # cache length in columns, padding included

        self._start()

    # ---- engine hooks (decode thread) ----

    def _warm_up(self) -> None:
        with torch.inference_mode():  # first-call kernel setup out of the first user's TTFT
            self.model(input_ids=torch.tensor([[self._stop_ids[0]] * 4], device=self.device), logits_to_keep=1)

    def _new_rng(self, seed: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        return gen

    def _iterate(self, new: list[Request]) -> None:
        with torch.inference_mode():
            for req in new:
                if not req.cancelled:
                    self._prefill(req)
                    self._flush()  # the first token goes out before the next prefill
            self._drop([i for i, r in enumerate(self._rows) if not r.cancelled])
            if self._rows:
                self._step()

    def _reset(self) -> None:
        self._rows, self._cache, self._pad, self._next, self._width = [], None, None, None, 0

    def _prefill(self, req: Request) -> None:
        cache = _new_cache(self.model.config)
        ids = torch.tensor([req.ids], device=self.device)
        self._charge_prefill(req, len(req.ids))
        logits = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
        tok = self._sample(logits[:, -1], [req])[0]
        if self._emit(req, tok):
            return
        self._join(req, cache, tok)

    def _join(self, req: Request, cache: DynamicCache, tok: int) -> None:
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

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        toks = logits.argmax(-1).tolist()
        for i, req in enumerate(reqs):
            s = req.sampling
            if s.temperature > 0:
                probs = torch.softmax(logits[i].float() / s.temperature, -1)
                if s.top_p < 1.0:
                    sorted_p, order = probs.sort(descending=True)
                    outside = sorted_p.cumsum(0) - sorted_p > s.top_p  # keep the smallest set reaching top_p
                    sorted_p[outside] = 0.0
                    toks[i] = int(order[torch.multinomial(sorted_p, 1, generator=req.rng)])
                else:
                    toks[i] = int(torch.multinomial(probs, 1, generator=req.rng))
        return toks
