"""Curation throughput on a synthetic warehouse.

    python -m benchmarks.curate --ratings 100000 --json

Seeds a fresh warehouse (``insert_events``, exactly as ingest writes) with synthetic multi-turn conversations:
~70% of turns rated (thumbs, some cleared), regenerations, side-by-side comparisons, ~5% of texts with PII,
~3% exact and ~2% near duplicates, users without consent, revoked and deleted users, truncated turns.
Then times read -> curate -> write snapshot and prints ``curate_s``, ``rows_per_s`` (ratings in / s) and the
manifest counts.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from feedback.events import ChatTurn, Feedback, Message, UserAction
from feedback.sink import insert_events
from feedback.warehouse import connect, ensure_schema

TOPICS = [
    "sorting lists",
    "python decorators",
    "sql joins",
    "rust lifetimes",
    "css grid",
    "git rebase",
    "unit testing",
    "http caching",
    "regular expressions",
    "binary search",
    "docker volumes",
    "linear algebra",
    "bread baking",
    "marathon training",
    "tax forms",
    "travel packing",
    "guitar chords",
    "chess openings",
]
VERBS = ["explain", "compare", "summarize", "give an example of", "list pitfalls of", "teach me", "debug my use of"]
WORDS = (
    "the a an of to in for on with by quickly carefully usually simply first then finally because however "
    "function value list table index cache query request response error result step option method pattern "
    "example detail reason case input output order number string object module thread lock file path"
).split()
NAMES = ["Maria Garcia", "James Miller", "Aisha Khan", "Wei Chen", "Olga Petrova", "Tom Baker"]


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _pii(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    return rng.choice(
        [
            f" My name is {name}.",
            f" Email me at {name.split()[0].lower()}{rng.randint(1, 999)}@example.com.",
            f" Call me on 415-555-{rng.randint(1000, 9999)}.",
            f" Ship it to {rng.randint(1, 999)} Maple Street.",
        ]
    )


def synth(n_ratings: int, seed: int = 7) -> list:
    rng = random.Random(seed)
    t0 = datetime(2026, 10, 1, tzinfo=UTC)
    ev: list = []
    ratings = 0
    k = 0
    dup_pool: list[tuple[str, str]] = []
    users = [f"user{i}" for i in range(max(10, n_ratings // 40))]
    no_consent = set(users[: len(users) // 50])

    def ts() -> datetime:
        nonlocal k
        k += 1
        return t0 + timedelta(milliseconds=k * 10)

    conv_i = 0
    while ratings < n_ratings:
        conv_i += 1
        user = rng.choice(users)
        consent = user not in no_consent
        conv = f"conv{conv_i}"
        msgs: list[Message] = []

        # turn() and rate() are called at once and must see this conversation's current user and messages.
        def turn(tid: str, answer: str, **kw) -> ChatTurn:
            kw.setdefault("latency_ms", 100.0)
            kw.setdefault("model_version", "base")
            return ChatTurn(
                ts=ts(),
                user_id=user,  # noqa: B023
                consent=consent,  # noqa: B023
                conversation_id=conv,  # noqa: B023
                turn_id=tid,
                messages=msgs,  # noqa: B023
                answer=answer,
                **kw,
            )

        def rate(tid: str, value: str, **kw) -> Feedback:
            kw.setdefault("kind", "thumbs")
            return Feedback(
                ts=ts(),
                user_id=user,  # noqa: B023
                consent=consent,  # noqa: B023
                conversation_id=conv,  # noqa: B023
                turn_id=tid,
                model_version="base",
                value=value,
                **kw,
            )

        for turn_i in range(rng.randint(1, 4)):
            if dup_pool and rng.random() < 0.05:
                prompt, answer = rng.choice(dup_pool)
                if rng.random() < 0.4:
                    answer = answer.replace(" the ", " a ", 1) + " ok"
            else:
                prompt = f"{rng.choice(VERBS).capitalize()} {rng.choice(TOPICS)}: {_sentence(rng, rng.randint(5, 25))}?"
                answer = f"Here is how {rng.choice(TOPICS)} works. {_sentence(rng, rng.randint(20, 80))}."
                if rng.random() < 0.05:
                    prompt += _pii(rng)
                if rng.random() < 0.02:
                    answer += _pii(rng)
                if len(dup_pool) < 2000 and rng.random() < 0.05:
                    dup_pool.append((prompt, answer))
            msgs = msgs + [Message(role="user", content=prompt)]
            tid = f"{conv}-t{turn_i}"
            finish = "length" if rng.random() < 0.02 else "stop"
            ev.append(turn(tid, answer, finish_reason=finish))
            r = rng.random()
            if r < 0.7:
                value = "up" if rng.random() < 0.6 else "down"
                ev.append(rate(tid, value, reason="unsafe advice" if value == "down" and rng.random() < 0.02 else None))
                ratings += 1
                if rng.random() < 0.03:
                    ev.append(rate(tid, "cleared"))
                    ratings += 1
                if value == "down" and rng.random() < 0.5:  # regenerate, rate the new answer
                    rid = tid + "-r"
                    ev.append(
                        turn(
                            rid,
                            f"Better: {_sentence(rng, rng.randint(20, 60))}.",
                            origin="regenerate",
                            parent_turn_id=tid,
                            latency_ms=90.0,
                        )
                    )
                    ev.append(rate(rid, "up"))
                    ratings += 1
            elif r < 0.78:
                bid = tid + "-b"
                ev.append(
                    turn(
                        bid,
                        f"Alternative: {_sentence(rng, rng.randint(20, 60))}.",
                        model_version="cand",
                        origin="compare",
                        latency_ms=90.0,
                    )
                )
                ev.append(rate(tid, rng.choice(["a", "b", "b", "tie"]), kind="pairwise", other_turn_id=bid))
                ratings += 1
            msgs = msgs + [Message(role="assistant", content=answer)]
            if ratings >= n_ratings:
                break
    for u in users[len(users) // 50 : len(users) // 50 + len(users) // 100]:
        ev.append(UserAction(ts=ts(), user_id=u, consent=False, action="consent_revoked"))
    for u in users[len(users) - len(users) // 100 :]:  # (users[-0:] would be everyone)
        ev.append(UserAction(ts=ts(), user_id=u, consent=True, action="delete_request"))
    return ev


_LEGACY_OPENERS = set(
    "please write explain tell give show help thanks thank hi hello hey yes no okay ok sure sorry also now here great "
    "good let list describe summarize translate compare create make find use try".split()
)


def legacy_scrub(scrubber, texts: list[str]) -> dict[str, str]:
    """The scrubber as it was before the gates (for ``--pii-compare``): every text with a digit, an ``@`` or a
    capitalised word other than a stop word / short opener list goes through full Presidio (NER + all entities)
    via ``BatchAnalyzerEngine``."""

    from presidio_analyzer import BatchAnalyzerEngine
    from presidio_anonymizer.entities import RecognizerResult
    from spacy.lang.en.stop_words import STOP_WORDS

    from pipelines.pii import _CAP_WORD

    openers = set(STOP_WORDS) | _LEGACY_OPENERS
    start = re.compile(r"(?:^|[.!?:;\n]\s*)\s*$")

    def candidate(t: str) -> bool:
        if re.search(r"[\d@]", t):
            return True
        return any(
            not start.search(t[: m.start(1)]) or m.group(1).lower() not in openers for m in _CAP_WORD.finditer(t)
        )

    scrubber._load()
    out = {t: t for t in texts}
    cands = [t for t in texts if t and candidate(t)]
    batch = BatchAnalyzerEngine(scrubber._analyzer)
    results = batch.analyze_iterator(
        cands,
        language="en",
        batch_size=scrubber.config.pii_batch_size,
        entities=scrubber.entities,
        score_threshold=scrubber.config.pii_score_threshold,
    )
    for t, found in zip(cands, results, strict=True):
        if found:
            rr = [RecognizerResult(r.entity_type, r.start, r.end, r.score) for r in found]
            out[t] = scrubber._anonymizer.anonymize(text=t, analyzer_results=rr).text
    return out


def _diff_window(text: str, old: str, new: str, width: int = 60) -> dict[str, str]:
    i = next((k for k, (x, y) in enumerate(zip(old, new, strict=False)) if x != y), min(len(old), len(new)))
    lo = max(0, i - width)
    return {"text": text[lo : i + width], "old": old[lo : i + width], "new": new[lo : i + width]}


def pii_compare(n_ratings: int, as_json: bool) -> dict:
    """Old (full Presidio on every loose candidate) vs new (gated, batched NER) on the same distinct texts."""
    from pipelines.config import CurateConfig
    from pipelines.pii import PiiScrubber

    texts: list[str] = []
    for e in synth(n_ratings):
        if isinstance(e, ChatTurn):
            texts.append(e.answer)
            texts.extend(m.content for m in e.messages)
    texts = list(dict.fromkeys(texts))
    cfg = CurateConfig()
    old_s = PiiScrubber(cfg)
    old_s._load()
    t = time.perf_counter()
    old = legacy_scrub(old_s, texts)
    old_dt = time.perf_counter() - t
    new_s = PiiScrubber(cfg)
    new_s._load()
    t = time.perf_counter()
    new = new_s.scrub_many(texts)
    new_dt = time.perf_counter() - t
    diff = [(t, old[t], new[t]) for t in texts if old[t] != new[t]]
    out = {
        "distinct_texts": len(texts),
        "old_s": round(old_dt, 2),
        "old_texts_per_s": round(len(texts) / old_dt, 1),
        "new_s": round(new_dt, 2),
        "new_texts_per_s": round(len(texts) / new_dt, 1),
        "speedup": round(old_dt / new_dt, 1),
        "new_stats": dict(new_s.stats),
        "old_redacted": sum(old[t] != t for t in texts),
        "new_redacted": sum(new[t] != t for t in texts),
        "outputs_differ": len(diff),
        "differ_examples": [_diff_window(a, b, c) for a, b, c in diff[:5]],
    }
    print(json.dumps(out, indent=None if as_json else 2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratings", type=int, default=10_000)
    ap.add_argument("--home", type=Path, default=None, help="Keep the warehouse/snapshot here (default: tmp).")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--pii-compare",
        action="store_true",
        help="Only time the PII scrubber, old vs new, on the distinct texts of --ratings synthetic ratings.",
    )
    args = ap.parse_args()
    if args.pii_compare:
        pii_compare(args.ratings, args.json)
        return

    from feedback.settings import Settings
    from pipelines import curate as cur
    from pipelines.config import CurateConfig
    from pipelines.pii import PiiScrubber
    from pipelines.snapshots import write_snapshot

    tmp = None
    home = args.home or Path(tmp := tempfile.mkdtemp(prefix="flywheel-bench-"))
    settings = Settings(home=home)
    t = time.perf_counter()
    events = synth(args.ratings)
    ensure_schema(settings.warehouse_path)
    with connect(settings.warehouse_path) as con:
        for i in range(0, len(events), 50_000):
            insert_events(con, events[i : i + 50_000])
    seed_s = time.perf_counter() - t

    cfg = CurateConfig()
    stages: list[tuple[str, float]] = []
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        stages.append((msg, time.perf_counter() - t0))
        if not args.json:
            print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    scrubber = PiiScrubber(cfg)
    src = cur.read_warehouse(settings.warehouse_path)
    read_s = time.perf_counter() - t0
    curated = cur.curate(src, cfg, scrubber, progress=progress)
    info = write_snapshot(curated, settings.datasets_dir)
    curate_s = time.perf_counter() - t0
    out = {
        "ratings": args.ratings,
        "feedback_rows": src.feedback.num_rows,
        "turns": src.turns.num_rows,
        "seed_s": round(seed_s, 2),
        "read_s": round(read_s, 2),
        "curate_s": round(curate_s, 2),
        "rows_per_s": round(src.feedback.num_rows / curate_s, 1),
        "snapshot_id": info.snapshot_id,
        "pii_engine": curated.pii_engine,
        "pii": curated.pii_stats,
        "counts": curated.counts(),
        "filters": [f.as_dict() for f in curated.filters],
        "stage_times_s": [{"after": re.match(r"[\w:]+", m).group(0), "t": round(s, 2)} for m, s in stages],
    }
    print(json.dumps(out, indent=2 if not args.json else None))
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
