"""The llama.cpp engine's prefill budget: how many prompt tokens a step may feed (``app/backends/llamacpp.py``)."""

from __future__ import annotations

import math


class PrefillBudget:
    """How many prompt tokens the next step may prefill.

    A step's time is about ``rows_s + n * u * (K + context)``: the decoding rows' share, and each prefilled
    token's own cost, which grows with the context it attends over (``K`` is the context at which attention costs
    as much as the rest of the token, measured on this model; a 64-token chunk took ~470 ms at ~1,500 tokens of
    context, so no fixed chunk keeps a running stream's pause short). ``rows_s`` and ``u`` are estimated from the
    steps just computed (``observe``), so the chunk shrinks as the prompt's context grows and as the machine
    gets busier. With nobody decoding, the budget doubles each step from ``start`` to ``most``."""

    def __init__(
        self, start: int = 64, most: int = 256, least: int = 8, step_target_s: float = 0.18, k_tokens: float = 2000
    ):
        self.start, self.most, self.least = max(1, start), max(1, most, start), max(1, min(least, start))
        self.step_target_s, self.k = step_target_s, k_tokens
        self.rows_s: float | None = None  # seconds of a step with decoding rows only
        self.u: float | None = None  # seconds per prefilled token per token of (K + context)
        self._alone = self.start

    def next(self, decoding: int, context: int = 0) -> int:
        """The budget of a step with ``decoding`` rows whose first prompt chunk starts at position ``context``."""
        if decoding == 0:
            budget, self._alone = self._alone, min(self.most, self._alone * 2)
            return budget
        self._alone = self.start
        if self.u is None:
            return self.start
        room = max(self.step_target_s - (self.rows_s or 0.0), 0.0)
        # n * u * (K + context + n / 2) = room: each token attends over the context before it
        a = self.k + context
        n = -a + math.sqrt(a * a + 2 * room / self.u)
        return int(max(self.least, min(self.most, n)))

    def observe(self, decoding: int, prefilled: int, seconds: float, context: float = 0.0) -> None:
        """A step with ``decoding`` rows and ``prefilled`` prompt tokens, attending on average over ``context``
        tokens, took ``seconds``."""
        if prefilled == 0:
            if decoding:
                self.rows_s = seconds if self.rows_s is None else 0.7 * self.rows_s + 0.3 * seconds
            return
        own = max(seconds - (self.rows_s or 0.0) if decoding else seconds, 1e-6) / prefilled
        u = own / (self.k + context)
        self.u = u if self.u is None else 0.3 * self.u + 0.7 * u  # the context grows: weigh the latest
