"""In-process generation on llama.cpp, continuously batched, with chunked prefill.

Why llama.cpp: decoding a 135M-parameter model one token at a time is a matrix-vector product per weight
matrix, bound by memory bandwidth. On this project's AMD EPYC machines PyTorch's fp32 path (MKL) reaches a
fraction of the copy bandwidth there, and PyTorch has no fast CPU path for lower precisions on AVX2-only cores
(bf16 emulated, int8 weight-only slower than fp32: measured, README "Serving speed"). ggml's hand-vectorised
kernels run near the bandwidth at f32, and q8_0 reads a quarter of the bytes. llama-cpp-python's low-level
bindings let this backend keep the app's own contract (``batching.py``) with llama.cpp doing the arithmetic.

How a step is built: one ``llama_batch`` holds, for every decoding sequence, its last sampled token, plus at most
``prefill_chunk`` prompt tokens of sequences still being prefilled (oldest first). So a long prompt is fed a
chunk per step, interleaved with everyone else's decoding, and never freezes the other streams; a short prompt
is prefilled within the step it arrives in. Each sequence has its own KV-cache stream (``kv_unified=False``),
so attention reads only its own history. The prompt is the model's chat template through the Hugging Face
tokenizer (the same ids the transformers engine feeds), and text is decoded by the same tokenizer.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import numpy as np

from app.backends.batching import BatchingBackend, Request
from app.backends.gguf import ensure_gguf

log = logging.getLogger(__name__)


def _llama():
    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its log callback prints below this level
    return llama_cpp


class LlamaCppBackend(BatchingBackend):
    """A model version served by llama.cpp from its GGUF export at ``precision`` (converted on first load)."""

    def __init__(
        self,
        model_path: str | Path,
        max_concurrency: int = 8,
        max_queue: int = 16,
        max_context_tokens: int = 2048,
        *,
        precision: str = "q8_0",
        num_threads: int | None = None,
        prefill_chunk: int = 128,
    ):
        from transformers import AutoTokenizer, GenerationConfig

        model_path = Path(model_path)
        self.precision = precision
        self.prefill_chunk = max(1, prefill_chunk)
        self.gguf_path = ensure_gguf(model_path, precision)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        try:
            eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        except OSError:  # no generation_config.json: the tokenizer's eos and the chat ends
            eos = None
        self._L = L = _llama()
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        self._model = L.llama_model_load_from_file(str(self.gguf_path).encode(), mparams)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {self.gguf_path}")
        context = min(max_context_tokens, L.llama_model_n_ctx_train(self._model) or max_context_tokens)
        threads = num_threads or len(os.sched_getaffinity(0))
        cparams = L.llama_context_default_params()
        cparams.n_seq_max = max_concurrency
        cparams.n_ctx = context * max_concurrency  # each sequence gets n_ctx / n_seq_max of its own
        cparams.kv_unified = False
        cparams.n_batch = cparams.n_ubatch = self.prefill_chunk + max_concurrency
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        self._ctx = L.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            L.llama_model_free(self._model)
            raise RuntimeError(f"llama.cpp could not create a context for {self.gguf_path}")
        self._mem = L.llama_get_memory(self._ctx)
        self._n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self._model))
        self._batch = L.llama_batch_init(cparams.n_batch, 0, 1)
        self._free = list(range(max_concurrency))[::-1]
        self._setup(f"llama.cpp:{model_path}@{precision}", tokenizer, eos, max_concurrency, max_queue, context)
        self._warm_up()
        self._start()

    def _warm_up(self) -> None:
        """One small prefill and a decode step, so first-call setup stays out of the first user's TTFT."""
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        self._fill([(0, ids, 0, True)])
        self._decode()
        self._fill([(0, [int(self._logits(0).argmax())], len(ids), True)])
        self._decode()
        self._L.llama_memory_seq_rm(self._mem, 0, -1, -1)

    # ---- engine hooks (decode thread) ----

    def _new_rng(self, seed: int) -> np.random.Generator:
        return np.random.default_rng(seed)

    def _iterate(self, new: list[Request]) -> None:
        for req in new:
            if not req.cancelled:
                req.slot, req.fed = self._free.pop(), 0
                self._rows.append(req)
        for req in [r for r in self._rows if r.cancelled]:
            self._release(req)
        if not self._rows:
            return
        parts, outs = self._plan()
        self._fill(parts)
        self._decode()
        for i, req in enumerate(outs):
            tok = self._sample(self._logits(i), req)
            if self._emit(req, tok):
                self._release(req)
            else:
                req.last = tok

    def _plan(self) -> tuple[list[tuple[int, list[int], int, bool]], list[Request]]:
        """This step's batch: each decoding row's last token, then prompt chunks within ``prefill_chunk``."""
        parts: list[tuple[int, list[int], int, bool]] = []
        outs: list[Request] = []
        for req in self._rows:
            if req.fed >= len(req.ids):
                parts.append((req.slot, [req.last], req.fed, True))
                outs.append(req)
                req.fed += 1
        budget = self.prefill_chunk
        for req in self._rows:
            if budget <= 0:
                break
            if req.fed < len(req.ids):
                chunk = req.ids[req.fed : req.fed + budget]
                finishes = req.fed + len(chunk) == len(req.ids)
                parts.append((req.slot, chunk, req.fed, finishes))
                if finishes:
                    outs.append(req)
                req.fed += len(chunk)
                budget -= len(chunk)
        return parts, outs

    def _fill(self, parts: list[tuple[int, list[int], int, bool]]) -> None:
        """Write ``(sequence, tokens, first position, want logits of the last)`` parts into the batch."""
        b = self._batch
        n = 0
        for seq, toks, pos, want in parts:
            for j, tok in enumerate(toks):
                b.token[n] = tok
                b.pos[n] = pos + j
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq
                b.logits[n] = want and j == len(toks) - 1
                n += 1
        b.n_tokens = n

    def _decode(self) -> None:
        rc = self._L.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _logits(self, i: int) -> np.ndarray:
        """The ``i``-th output row of the last decode (outputs follow the batch order)."""
        ptr = self._L.llama_get_logits_ith(self._ctx, i)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self._n_vocab,))

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
        self._L.llama_memory_seq_rm(self._mem, req.slot, -1, -1)
        self._free.append(req.slot)

    def _reset(self) -> None:
        self._L.llama_memory_clear(self._mem, True)
        self._free = list(range(self.max_concurrency))[::-1]

    def _shutdown(self) -> None:
        L = self._L
        L.llama_batch_free(self._batch)
        L.llama_free(self._ctx)
        L.llama_model_free(self._model)
