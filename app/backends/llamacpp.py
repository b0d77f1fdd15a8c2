"""In-process generation on llama.cpp, continuously batched, with chunked prefill.

Why llama.cpp: decoding a 135M-parameter model one token at a time is a matrix-vector product per weight
matrix, bound by memory bandwidth. On this project's AMD EPYC machines PyTorch's fp32 CPU path reaches a fraction
of the copy bandwidth, and PyTorch has no fast CPU path for lower precisions on AVX2-only cores (measured: README
"Serving speed"). ggml's vectorised kernels run close to the bandwidth, and q8_0 reads about a quarter of fp32's
bytes. llama-cpp-python's low-level bindings let this backend keep the app's own contract (``batching.py``:
bound, streaming, cancellation) while llama.cpp does the arithmetic.

How a step is built: one ``llama_batch`` holds, for every decoding sequence, its last sampled token, plus prompt
tokens of sequences still being prefilled (the party served least first) up to this step's prefill budget
(``PrefillBudget``). So a long prompt is fed a chunk per step, interleaved with everyone else's decoding, while a
short prompt is prefilled within the step it arrives in. The budget is sized by measured cost: while streams
decode, as many prompt tokens as keep the step within ``step_target_s`` (their pause between two tokens); while
no stream decodes, it doubles each step up to ``prefill_max`` (nobody waits on the step, so bigger chunks only
make the prompt's own first token sooner). Each sequence has its own KV-cache stream
(``kv_unified=False``), so attention reads only its own history. Prompts are the model's chat template through
the Hugging Face tokenizer (the same ids the transformers engine feeds), and text is decoded by the same tokenizer.

Prefix reuse: a finished request's slot keeps its KV cache (prompt and answer). A new request takes the free slot
whose cached tokens share the longest prefix with its prompt and prefills only the rest, as llama.cpp's own server
does: the next turn of a conversation skips its whole history, and any request skips the chat template's system
prompt. Caches are reused only within one ``cache_scope`` (the app passes the user), so how fast a first token
comes never tells one user what another sent; ``forget_scope`` drops a scope's caches (a user's deletion). The one
prefix every scope may share is the chat template's own preamble (its default system prompt and the user header,
public since it is in the model's files): it is prefilled once into a sequence of its own and copied into a fresh
slot instead of being prefilled again (24 of a short prompt's ~43 tokens for the default model).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from app.backends.batching import BatchingBackend, Request
from app.backends.gguf import ensure_gguf
from app.backends.prefill import PrefillBudget

log = logging.getLogger(__name__)

Part = tuple[int, list[int], int, bool]  # (sequence id, tokens, position of the first, logits for the last?)


# Every llama.cpp call that computes runs on this one thread, whichever version (context) it is for. llama.cpp's
# OpenMP runtime keeps a team of worker threads for each thread that ever computed; with a team per loaded version
# libgomp counts more threads than cores, stops spinning at its barriers, and each token pays ~100 sleeps and
# wakes: one stream's token took 16 ms with one version loaded, 30 ms with two and 70 ms with three. The cores
# cannot decode two versions at once anyway, so their steps take turns here.
_llama_thread_id: int | None = None


def _mark_llama_thread() -> None:
    global _llama_thread_id
    _llama_thread_id = threading.get_ident()


_LLAMA_THREAD = ThreadPoolExecutor(1, thread_name_prefix="llama.cpp", initializer=_mark_llama_thread)


def _on_llama_thread(fn, *args):
    """``fn(*args)`` on the llama.cpp thread (directly when already there); returns or raises what it does."""
    if threading.get_ident() == _llama_thread_id:
        return fn(*args)
    return _LLAMA_THREAD.submit(fn, *args).result()


def _llama():
    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its log callback prints below this level
    return llama_cpp


class Engine:
    """One GGUF model and one context: fill a batch, decode it, read logits. Not thread-safe: one owner."""

    # A step of at most this many tokens (decoding rows, no prompt chunk) computes on ``small_threads`` threads.
    # Measured per step on 2 cores (sleeping OpenMP waits, the stack's setting): 1 row 10 ms on one thread vs 21 ms
    # on two, 4 rows 22 vs 41, 8 rows 40 vs 42; a 64-token prompt chunk 96 vs 74 ms, 256 tokens 356 vs 201 ms
    # (``python -m benchmarks.threads``). A small step is too little work to pay two threads' wake-ups at each of
    # its ~100 barriers, and one thread never waits on a partner descheduled by a process beside it (training).
    SMALL_STEP_TOKENS = 16

    def __init__(
        self,
        gguf_path: Path,
        n_ctx: int,
        n_seq: int,
        n_batch: int,
        num_threads: int | None = None,
        small_threads: int | None = None,
    ):
        self.threads = num_threads or len(os.sched_getaffinity(0))
        if small_threads is None:  # spinning waits (OpenMP's default) make two threads pay off even on small steps
            passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
            small_threads = 1 if passive else self.threads
        self.small_threads = max(1, min(small_threads, self.threads))
        self._threads_now = self.threads
        _on_llama_thread(self._load, gguf_path, n_ctx, n_seq, n_batch, self.threads)

    def _load(self, gguf_path: Path, n_ctx: int, n_seq: int, n_batch: int, num_threads: int | None) -> None:
        self.L = L = _llama()
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(gguf_path).encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        self.n_ctx_train = L.llama_model_n_ctx_train(self.model)
        threads = num_threads
        cparams = L.llama_context_default_params()
        cparams.n_seq_max = n_seq
        cparams.n_ctx = n_ctx  # each sequence gets n_ctx / n_seq of its own
        cparams.kv_unified = False
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {gguf_path}")
        self.mem = L.llama_get_memory(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_batch = n_batch
        self.batch = L.llama_batch_init(n_batch, 0, 1)

    def decode(self, parts: list[Part]) -> list[int]:
        """Run one batch; returns the batch index of each part's logits row (-1 where none was asked for), in the
        order of ``parts``.

        The batch is laid out by ascending sequence id, whatever the order of ``parts``. With one KV stream per
        sequence, llama.cpp splits a batch whose sequences come out of order into more, smaller pieces: an 8-row
        decoding step took 31 ms in order and 80-100 ms shuffled or reversed (f16, 2 threads). Slots are reused
        in the order requests finish, so served batches were out of order after the first wave of requests.
        """
        b = self.batch
        n = 0
        rows = [-1] * len(parts)
        for k in sorted(range(len(parts)), key=lambda k: parts[k][0]):
            seq, toks, pos, want = parts[k]
            if want:
                rows[k] = n + len(toks) - 1
            for j, tok in enumerate(toks):
                b.token[n] = tok
                b.pos[n] = pos + j
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq
                b.logits[n] = want and j == len(toks) - 1
                n += 1
        b.n_tokens = n
        rc = _on_llama_thread(self._decode, b, self.small_threads if n <= self.SMALL_STEP_TOKENS else self.threads)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return rows

    def _decode(self, batch, threads: int) -> int:
        if threads != self._threads_now:
            self.L.llama_set_n_threads(self.ctx, threads, threads)
            self._threads_now = threads
        return self.L.llama_decode(self.ctx, batch)

    def logits(self, i: int) -> np.ndarray:
        """Logits of the last decode's batch token ``i`` (one asked for); valid until the next decode."""
        ptr = ctypes.cast(self.L.llama_get_logits_ith(self.ctx, i), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def copy(self, src: int, dst: int) -> None:
        """Make sequence ``dst``'s cache a copy of ``src``'s (its stream's buffer is copied at the next decode)."""
        _on_llama_thread(self.L.llama_memory_seq_cp, self.mem, src, dst, -1, -1)

    def forget(self, seq: int = -1, keep: int = 0) -> bool:
        """Drop one sequence's cache from position ``keep`` on (all sequences with -1); False if llama.cpp could not
        keep that prefix (the sequence is then dropped whole)."""
        return _on_llama_thread(self._forget, seq, keep)

    def _forget(self, seq: int, keep: int) -> bool:
        if seq < 0:
            self.L.llama_memory_clear(self.mem, True)
            return True
        if keep > 0 and self.L.llama_memory_seq_rm(self.mem, seq, keep, -1):
            return True
        self.L.llama_memory_seq_rm(self.mem, seq, -1, -1)
        return keep <= 0

    def close(self) -> None:
        _on_llama_thread(self._close)

    def _close(self) -> None:
        if self.ctx:
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.L.llama_model_free(self.model)
            self.ctx = None


class LlamaCppBackend(BatchingBackend):
    """A model version served by llama.cpp from its GGUF export at ``precision`` (converted on first load)."""

    def __init__(
        self,
        model_path: str | Path,
        max_concurrency: int = 8,
        max_queue: int = 16,
        max_context_tokens: int = 2048,
        *,
        precision: str = "f16",
        num_threads: int | None = None,
        small_step_threads: int | None = None,  # threads of a step of a few decoding rows (``Engine``)
        prefill_chunk: int = 64,  # the first chunk; 8 users arriving at once: TTFT p50 320-365 ms at 64, 420-430 at 128
        prefill_max: int = 256,  # the most prompt tokens a step prefills (the budget's ceiling)
        step_target_s: float = 0.18,  # while streams decode, a step (their pause between tokens) this long at most
    ):
        from transformers import AutoTokenizer, GenerationConfig

        model_path = Path(model_path)
        self.precision = precision
        self.prefill_chunk = max(1, prefill_chunk)
        self.budget = PrefillBudget(self.prefill_chunk, max(prefill_max, self.prefill_chunk), 8, step_target_s)
        self.gguf_path = ensure_gguf(model_path, precision)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        try:
            eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        except OSError:  # no generation_config.json: the tokenizer's eos and the usual chat ends
            eos = None
        n_batch = self.budget.most + max_concurrency  # one token per decoding row plus the largest prefill
        # sequences 0..max_concurrency-1 are the slots; one more holds the template's public preamble
        self._template_seq = max_concurrency
        self._engine = Engine(
            self.gguf_path,
            max_context_tokens * (max_concurrency + 1),
            max_concurrency + 1,
            n_batch,
            num_threads,
            small_step_threads,
        )
        context = min(max_context_tokens, self._engine.n_ctx_train or max_context_tokens)
        self._free = list(range(max_concurrency))[::-1]
        # slot -> (scope, tokens its KV cache holds), for free slots; the dict's order is least recently used first
        self._cached: dict[int, tuple[str | None, list[int]]] = {}
        self._cache_mu = threading.Lock()  # guards _cached, _free, _claims and _forgotten against forget_scope
        self._claims = 0  # requests given a slot so far: a request's number orders it against a forget_scope
        self._forgotten: dict[str | None, int] = {}  # scope -> claims before its last forget_scope
        self.prefix_tokens_reused = 0  # prompt tokens not prefilled thanks to a cached prefix (tests read it)
        self._setup(f"llama.cpp:{model_path}@{precision}", tokenizer, eos, max_concurrency, max_queue, context)
        self._public = self._template_preamble()[: self.prefill_chunk]
        self._template_ready = False
        self._start()

    def _template_preamble(self) -> list[int]:
        """The tokens every conversation without a system message starts with: the chat template's own preamble."""
        a, b = (self.encode([{"role": "user", "content": text}]) for text in ("a", "zzz b"))
        return a[: next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), 0)]

    def _warm_up(self) -> None:
        """One small prefill and a decode step, so first-call setup stays out of the first user's TTFT; then the
        template's preamble into its own sequence."""
        ids = self.encode([{"role": "user", "content": "Hi"}])[: self.prefill_chunk]
        (row,) = self._engine.decode([(0, ids, 0, True)])
        self._engine.decode([(0, [int(self._engine.logits(row).argmax())], len(ids), True)])
        self._engine.forget(0)
        self._ensure_template()

    def _ensure_template(self) -> None:
        if not self._template_ready and self._public:
            self._engine.decode([(self._template_seq, self._public, 0, False)])
            self._template_ready = True

    # ---- engine hooks (decode thread) ----

    def _new_rng(self, seed: int) -> np.random.Generator:
        return np.random.default_rng(seed)

    def _iterate(self, new: list[Request]) -> None:
        for req in new:
            if not req.cancelled:
                self._claim(req)
                self._rows.append(req)
        for req in [r for r in self._rows if r.cancelled]:
            self._release(req)
        if not self._rows:
            return
        parts, outs, decoding = self._plan()
        t0 = time.perf_counter()
        rows = [i for i in self._engine.decode(parts) if i >= 0]
        chunks = parts[decoding:]
        prefilled = sum(len(toks) for _, toks, _, _ in chunks)
        context = sum(len(toks) * (pos + len(toks) / 2) for _, toks, pos, _ in chunks) / max(prefilled, 1)
        self.budget.observe(decoding, prefilled, time.perf_counter() - t0, context)
        for i, req in zip(rows, outs, strict=True):
            tok = self._sample(self._engine.logits(i), req)
            req.extra.setdefault("answer", []).append(tok)
            if self._emit(req, tok):
                self._release(req)
            else:
                req.last = tok

    def _claim(self, req: Request) -> None:
        """Give ``req`` the free slot whose cache (same scope) shares the longest prefix with its prompt, or else
        the least recently used one; only the rest of the prompt is then prefilled (at least its last token,
        whose logits give the first answer token)."""
        with self._cache_mu:  # against forget_scope, from another thread
            self._claim_locked(req)

    def _claim_locked(self, req: Request) -> None:
        limit = len(req.ids) - 1
        public = _shared(self._public, req.ids, limit)  # what any scope's cache may give this request
        best, shared, copy = None, 0, False
        for slot in self._free:  # this scope's own caches first
            scope, toks = self._cached.get(slot, (None, []))
            if scope == req.scope and (same := _shared(toks, req.ids, limit)) > shared:
                best, shared = slot, same
        if best is None or shared < public:  # an empty slot, else the one used longest ago, holding the preamble
            empty = [s for s in self._free if s not in self._cached]
            best = empty[-1] if empty else next(s for s in self._cached if s in self._free)
            shared = min(_shared(self._cached.get(best, (None, []))[1], req.ids, limit), public)
            copy = public - shared >= 4  # copying the preamble (~4 ms) beats prefilling 4 or more tokens
        self._free.remove(best)
        self._cached.pop(best, None)
        if copy:
            self._ensure_template()
            self._engine.copy(self._template_seq, best)
            shared = public
        if not self._engine.forget(best, shared):
            shared = 0
        req.slot, req.fed = best, shared
        self._claims += 1
        req.extra["claim"] = self._claims
        req.extra["cached"] = shared
        self.prefix_tokens_reused += shared

    def forget_scope(self, scope: str) -> int:
        """Drop every cached prefix of ``scope`` (a deleted user's conversations) from any thread, and keep none of
        the scope's requests already admitted when they finish; returns how many slots it cleared. Blocks while a
        step is being computed (up to a few hundred ms)."""
        with self._cache_mu:
            self._forgotten[scope] = self._claims  # requests admitted before now keep nothing when they finish
            slots = [slot for slot, (s, _) in self._cached.items() if s == scope]
            for slot in slots:
                del self._cached[slot]
                self._engine.forget(slot)
        return len(slots)

    def _plan(self) -> tuple[list[Part], list[Request], int]:
        """This step's batch: each decoding row's last token, then prompt chunks within the step's budget
        (``PrefillBudget``), the party served least first (``_order``): a flooder's long prompts wait behind a
        quiet user's short one. Also returns how many rows decode."""
        parts: list[Part] = []
        outs: list[Request] = []
        for req in self._rows:
            if req.fed >= len(req.ids):
                parts.append((req.slot, [req.last], req.fed, True))
                outs.append(req)
                req.fed += 1
        decoding = len(parts)
        prefilling = sorted((r for r in self._rows if r.fed < len(r.ids)), key=self._order)
        budget = self.budget.next(decoding, prefilling[0].fed) if prefilling else 0
        for req in prefilling:
            if budget <= 0:
                break
            chunk = req.ids[req.fed : req.fed + budget]
            finishes = req.fed + len(chunk) == len(req.ids)
            parts.append((req.slot, chunk, req.fed, finishes))
            if finishes:
                outs.append(req)
            req.fed += len(chunk)
            budget -= len(chunk)
            self._charge_prefill(req, len(chunk))
        return parts, outs, decoding

    def _sample(self, logits: np.ndarray, req: Request) -> int:
        s = req.sampling
        if s.temperature <= 0:
            return int(logits.argmax())
        z = logits.astype(np.float64) / s.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if s.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            sp = p[order]
            sp[np.cumsum(sp) - sp > s.top_p] = 0.0  # keep the smallest set reaching top_p
            return int(order[req.rng.choice(len(sp), p=sp / sp.sum())])
        return int(req.rng.choice(len(p), p=p))

    def _release(self, req: Request) -> None:
        self._rows.remove(req)
        held = (req.ids + req.extra.get("answer", []))[: req.fed]  # what the slot's cache now holds
        with self._cache_mu:
            if held and req.extra["claim"] > self._forgotten.get(req.scope, 0):
                self._cached[req.slot] = (req.scope, held)
            else:
                self._engine.forget(req.slot)
            self._free.append(req.slot)

    def _reset(self) -> None:
        with self._cache_mu:
            self._engine.forget()
            self._template_ready = False
            self._cached.clear()
            self._free = list(range(self.max_concurrency))[::-1]

    def _shutdown(self) -> None:
        self._engine.close()


def _shared(cached: list[int], ids: list[int], limit: int) -> int:
    """Length of the common prefix of ``cached`` and ``ids``, at most ``limit``."""
    n = min(len(cached), limit)
    return next((i for i in range(n) if cached[i] != ids[i]), max(n, 0))
