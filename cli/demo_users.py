"""Simulated users for ``flywheel demo`` that chat until the demo tells them to stop.

``cli.simulate.run_simulation`` runs for a fixed time or number of questions; the demo needs users who chat until
the STACK does something (the volume trigger fires, the autopilot decides a release), so this runs the same
``SimUser`` (same tastes, same judgement, same public API) in threads with a stop event. Each user also notes how
many words every answer had and which version gave it: the form side of a change, beside the correctness and
hidden utility that ``SimStats`` records.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx

from cli.prompt_set import PromptItem, load_prompt_set
from cli.simulate import Answer, SimConfig, SimStats, SimUser

Words = list[tuple[str, int]]  # (version, words of one answer)


class CountingUser(SimUser):
    """A simulated user who also notes each answer's length in words, per version."""

    def __init__(self, client: httpx.Client, cfg: SimConfig, idx: int, prompts: list[PromptItem]):
        super().__init__(client, cfg, idx, prompts)
        self.words: Words = []

    def assess(self, a: Answer, item: PromptItem) -> Answer:
        a = super().assess(a, item)
        self.words.append((a.version, len(a.text.split())))
        return a


def _chat(url: str, cfg: SimConfig, idx: int, prompts: list[PromptItem], stop: threading.Event, deadline: float):
    """One user's session: questions until ``stop`` or ``deadline``; some withdraw consent part-way and leave."""
    with httpx.Client(base_url=url, timeout=300) as client:
        u = CountingUser(client, cfg, idx, prompts)
        withdraw_after = u.rng.randint(1, 3) if u.consent and u.rng.random() < cfg.withdraw_rate else None
        asked = 0
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                u.one_question()
                asked += 1
                if withdraw_after is not None and asked == withdraw_after:
                    u.withdraw_consent()
                    break
        except httpx.HTTPError as e:  # the app went away or stalled: this user leaves, the others go on
            u.stats.errors += 1
            u.stats.note_error(f"{type(e).__name__}: {e}")
        return u.stats, u.words


class Crowd:
    """``cfg.users`` simulated users chatting concurrently through the public API until ``finish()``."""

    def __init__(self, url: str, cfg: SimConfig, max_s: float):
        self.url, self.cfg, self.max_s = url, cfg, max_s
        self.stop_event = threading.Event()
        self.pool: ThreadPoolExecutor | None = None
        self.futures: list[Future] = []
        self.started = 0.0

    def start(self) -> Crowd:
        prompts = load_prompt_set(self.cfg.prompts)
        self.started = time.monotonic()
        deadline = self.started + self.max_s
        self.pool = ThreadPoolExecutor(self.cfg.users, thread_name_prefix=self.cfg.user_prefix)
        self.futures = [
            self.pool.submit(_chat, self.url, self.cfg, i, prompts, self.stop_event, deadline)
            for i in range(self.cfg.users)
        ]
        return self

    def done(self) -> bool:
        return all(f.done() for f in self.futures)

    def finish(self) -> tuple[SimStats, Words]:
        """Stop asking (each user finishes the question in hand) and merge what every user measured."""
        self.stop_event.set()
        total, words = SimStats(), []
        for f in self.futures:
            stats, w = f.result()
            total.merge(stats)
            words += w
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        total.seconds = round(time.monotonic() - self.started, 1)
        return total, words
