"""Quality checks of a llama.cpp precision: teacher-forced likelihood (``score``) and greedy continuations
(``greedy``) on the engine that serves (``app/backends/llamacpp.py``); ``benchmarks/serve.py`` and the tests use
them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.backends.llamacpp import Engine, _on_llama_thread


def score(gguf_path: str | Path, sequences: list[tuple[list[int], int]], num_threads: int | None = None):
    """Negative log-likelihood (nats, summed) of each sequence's tokens from index ``start`` on, and their count:
    perplexity is ``exp(nll / count)``."""
    longest = max(len(ids) for ids, _ in sequences)
    engine = Engine(Path(gguf_path), max(256, longest), 1, longest, num_threads)
    nll, count = 0.0, 0
    try:
        for ids, start in sequences:
            engine.forget()
            b = engine.batch
            for j, tok in enumerate(ids):
                b.token[j], b.pos[j], b.n_seq_id[j] = tok, j, 1
                b.seq_id[j][0] = 0
                b.logits[j] = start - 1 <= j < len(ids) - 1
            b.n_tokens = len(ids)
            if _on_llama_thread(engine.L.llama_decode, engine.ctx, b) != 0:
                raise RuntimeError("llama_decode failed while scoring")
            for j in range(start - 1, len(ids) - 1):
                z = engine.logits(j).astype(np.float64)
                m = z.max()
                nll += float(m + np.log(np.exp(z - m).sum()) - z[ids[j + 1]])
                count += 1
    finally:
        engine.close()
    return nll, count


def greedy(
    gguf_path: str | Path, prompts: list[list[int]], new_tokens: int, stop: set[int], num_threads: int | None = None
) -> list[list[int]]:
    """Greedy continuations (token ids, stop token excluded) of each prompt, one at a time: what a solo stream
    of the backend produces."""
    engine = Engine(Path(gguf_path), max(256, max(map(len, prompts)) + new_tokens), 1, 512, num_threads)
    out = []
    try:
        for ids in prompts:
            engine.forget()
            for k in range(0, len(ids), 512):
                (row,) = engine.decode([(0, ids[k : k + 512], k, k + 512 >= len(ids))])
            toks: list[int] = []
            while len(toks) < new_tokens:
                tok = int(engine.logits(row).argmax())
                if tok in stop:
                    break
                toks.append(tok)
                (row,) = engine.decode([(0, [tok], len(ids) + len(toks) - 1, True)])
            out.append(toks)
    finally:
        engine.close()
    return out
