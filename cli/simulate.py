"""``flywheel simulate``: simulated users chat with the running product through its public API and rate the
answers, so the loop (events -> warehouse -> curated sets) has data to work on without real users.

    flywheel simulate --users 4 --turns 3

Each user consents (or not, ``--consent-rate``), asks questions from a small bundled list, sometimes asks for a
second sample and compares the two (pairwise), and gives thumbs with reasons. The rating policy is a crude,
explicit stand-in for taste: it prefers answers that are complete (finished with "stop") and of moderate length.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import httpx
import typer

from feedback.settings import get_settings

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain photosynthesis to a ten-year-old.",
    "How do I reverse a list in Python?",
    "What is the difference between weather and climate?",
    "Write a haiku about autumn.",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot.",
    "How many minutes are in a day?",
    "What should I pack for a weekend hike?",
]
DOWN_REASONS = ["Too long", "Did not answer the question", "Cut off in the middle", "Not accurate"]


@dataclass
class SimStats:
    users: int = 0
    turns: int = 0
    thumbs: int = 0
    comparisons: int = 0
    errors: int = 0
    busy_retries: int = 0
    seconds: float = 0.0


def _score(answer: str, finish: str) -> float:
    words = len(answer.split())
    return (1.0 if finish == "stop" else 0.0) + (1.0 if 5 <= words <= 80 else 0.0)


def _ask(client: httpx.Client, user: str, consent: bool, conv: str, prompt: str, max_tokens: int,
         stats: SimStats) -> dict | None:
    body = {"model": "flywheel", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.8}
    headers = {"X-Flywheel-User": user, "X-Flywheel-Consent": "1" if consent else "0",
               "X-Flywheel-Conversation": conv}
    for _ in range(20):
        r = client.post("/v1/chat/completions", json=body, headers=headers)
        if r.status_code == 429:
            stats.busy_retries += 1
            time.sleep(0.5)
            continue
        if r.status_code != 200:
            stats.errors += 1
            return None
        stats.turns += 1
        d = r.json()
        return {"id": d["id"], "answer": d["choices"][0]["message"]["content"],
                "finish": d["choices"][0]["finish_reason"]}
    stats.errors += 1
    return None


def _rate(client: httpx.Client, user: str, payload: dict, stats: SimStats) -> None:
    r = client.post("/v1/feedback", json=payload, headers={"X-Flywheel-User": user})
    if r.status_code >= 300:
        stats.errors += 1


def _one_user(base_url: str, idx: int, turns: int, max_tokens: int, consent_rate: float, compare_rate: float,
              seed: int) -> SimStats:
    stats = SimStats(users=1)
    rng = random.Random(seed * 1000 + idx)
    user = f"sim-{seed}-{idx}"
    consent = rng.random() < consent_rate
    with httpx.Client(base_url=base_url, timeout=120) as client:
        for _ in range(turns):
            prompt = rng.choice(PROMPTS)
            conv = uuid.uuid4().hex
            a = _ask(client, user, consent, conv, prompt, max_tokens, stats)
            if a is None:
                continue
            if rng.random() < compare_rate:
                b = _ask(client, user, consent, conv, prompt, max_tokens, stats)
                if b is not None:
                    sa, sb = _score(a["answer"], a["finish"]), _score(b["answer"], b["finish"])
                    verdict = "tie" if sa == sb else ("a" if sa > sb else "b")
                    _rate(client, user, {"turn_id": a["id"], "other_turn_id": b["id"], "rating": verdict}, stats)
                    stats.comparisons += 1
            good = _score(a["answer"], a["finish"]) >= 2 or rng.random() < 0.2
            payload = {"turn_id": a["id"], "rating": "up" if good else "down"}
            if not good:
                payload["reason"] = rng.choice(DOWN_REASONS)
            _rate(client, user, payload, stats)
            stats.thumbs += 1
    return stats


def simulate(
    users: int = typer.Option(4, help="Simulated users, chatting concurrently."),
    turns: int = typer.Option(3, help="Questions per user."),
    max_tokens: int = typer.Option(48, help="Answer length cap (keep it small on CPU)."),
    consent_rate: float = typer.Option(0.9, help="Share of users who allow their data to be used."),
    compare_rate: float = typer.Option(0.5, help="Share of questions answered twice and compared."),
    url: str = typer.Option("", help="Base URL of the app; default from settings (127.0.0.1:7860)."),
    seed: int = typer.Option(0, help="Changes who the users are and what they ask."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Simulated users chat with the running app through its API and rate the answers."""
    s = get_settings()
    base = url or f"http://{s.app_host}:{s.app_port}"
    try:
        httpx.get(f"{base}/healthz", timeout=5).raise_for_status()
    except httpx.HTTPError as e:
        typer.echo(f"simulate: the app at {base} is not answering ({e}); start it with `make run`", err=True)
        raise typer.Exit(1) from None
    stats = SimStats()
    t0 = time.monotonic()
    with ThreadPoolExecutor(users) as pool:
        futures = [pool.submit(_one_user, base, i, turns, max_tokens, consent_rate, compare_rate, seed)
                   for i in range(users)]
        for f in futures:
            one = f.result()
            for k, v in asdict(one).items():
                setattr(stats, k, getattr(stats, k) + v)
    stats.seconds = round(time.monotonic() - t0, 1)
    if as_json:
        print(json.dumps(asdict(stats)))
    else:
        typer.echo(f"simulate: {stats.users} users, {stats.turns} answers, {stats.thumbs} thumbs, "
                   f"{stats.comparisons} comparisons, {stats.errors} errors, {stats.busy_retries} busy retries "
                   f"in {stats.seconds}s. `flywheel status` shows them landing in the warehouse.")
    if stats.errors:
        raise typer.Exit(1)
