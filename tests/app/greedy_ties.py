"""Greedy answers that differ only where the model itself cannot decide.

Two greedy answers to one prompt, served alone and inside a batch, may part at a near-tie: the batch changes the
shapes of the matrix products (llama.cpp picks other kernels for another number of rows, transformers pads), and
the last bits of two nearly equal logits can swap. CI saw this twice on the default 135M model, which has many
near-ties: "beyond the boundaries" vs "beyond the horizon" (llama.cpp, a batch of four), and one answer a word
shorter (transformers, a late join). A stream that got another stream's tokens, a wrong position or a stale cache
parts where the model is sure. So: where two answers part, the model's own one-sequence forward pass
(``reference_logits``) must score both tokens there within ``TIE`` logits of each other.
"""

from __future__ import annotations

import numpy as np

# Logits of two tokens closer than this are a tie the batch's arithmetic may break either way. CI's "boundaries"
# vs "horizon" were 19.867 vs 19.869 (a gap of 0.001) on the model's own forward pass; a wrong word ("blue" for
# "mysterious" in the same answer) is 10 logits behind.
TIE = 0.1


def reference_logits(backend, ids: list[int]) -> np.ndarray:
    """The next-token logits after ``ids``, from one sequence alone on the backend's own engine and weights."""
    if hasattr(backend, "model"):  # transformers
        import torch

        with torch.inference_mode():
            return backend.model(torch.tensor([ids], device=backend.model.device)).logits[0, -1].float().cpu().numpy()
    from app.backends.llamacpp import Engine

    engine = Engine(backend.gguf_path, max(256, len(ids) + 1), 1, 512)
    try:
        for k in range(0, len(ids), 512):
            (row,) = engine.decode([(0, ids[k : k + 512], k, k + 512 >= len(ids))])
        return engine.logits(row).astype(np.float64).copy()
    finally:
        engine.close()


def parting(backend, messages: list[dict[str, str]], a: str, b: str) -> tuple[int, float, str] | None:
    """None when the answers are equal; else where they part (token index), the logit gap there between the two
    tokens (an answer that ended there chose its stop token) and a description for an assertion message."""
    if a == b:
        return None
    tok = backend.tokenizer
    ids_a, ids_b = (tok.encode(t, add_special_tokens=False) for t in (a, b))
    k = 0
    while k < min(len(ids_a), len(ids_b)) and ids_a[k] == ids_b[k]:
        k += 1
    stop = backend._stop_ids[0]
    next_a = ids_a[k] if k < len(ids_a) else stop
    next_b = ids_b[k] if k < len(ids_b) else stop
    logits = reference_logits(backend, backend.encode(messages) + ids_a[:k])
    gap = abs(float(logits[next_a]) - float(logits[next_b]))
    best = float(logits.max())
    what = (
        f"part at token {k} after {tok.decode(ids_a[:k])!r}: {tok.decode([next_a])!r} vs {tok.decode([next_b])!r}, "
        f"logits {logits[next_a]:.3f} vs {logits[next_b]:.3f} (best {best:.3f}, tie below {TIE})"
    )
    return k, gap, what


def assert_same_up_to_ties(backend, messages_per_answer: list[list[dict[str, str]]], got: list[str], want: list[str]):
    """Each pair of answers is equal, or parts only at a near-tie of the model's own logits."""
    assert len(got) == len(want)
    problems = []
    for messages, a, b in zip(messages_per_answer, want, got, strict=True):
        p = parting(backend, messages, a, b)
        if p is not None and p[1] >= TIE:
            problems.append(f"{messages[-1]['content']!r}: {p[2]}\n  alone:   {a!r}\n  batched: {b!r}")
    assert not problems, "answers parted where the model is sure:\n" + "\n".join(problems)
