"""Simulated AI trainers through the workspace's HTTP API (issue 18's benchmark).

    python -m benchmarks.labeling --json [--trainers 6] [--items 60] [--overlap 3]

A real queue file and role store in a temporary home, the real ``/annotation`` router served by uvicorn on
127.0.0.1, and simulated trainers, each with a known accuracy ``p``: on a compare item of K=3 answers with a true
order, a trainer gives the true ranking with probability ``p`` and a uniformly random one otherwise (so a random
pick is sometimes right too); gold items (``app/annotation/gold.py``) come unannounced, one in ``gold_every``.
The trainers work concurrently, one thread each, through ``GET /annotation/next`` and
``POST /annotation/tasks/{id}/judgment``.

Reports:
- ``tasks_per_hour`` per trainer (they think for ``--think-ms`` per task) and ``next_task_p95_ms`` (target < 300);
- ``alpha_measured``: Krippendorff's ordinal alpha of the rankings the queue recorded (``pipelines.agreement``),
  against ``alpha_simulated``: the same annotator model's alpha on a large Monte-Carlo draw (target: within 0.05);
- ``gold_accuracy_recovered``: each trainer's accuracy on gold items (``pipelines.agreement.trust_scores``) against
  the accuracy their ``p`` implies, ``p + (1 - p) / 2`` on two answers, and the rank correlation of trust with ``p``.

With ``--effect``, also the model effect (``benchmarks/labeling_effect.py``, about 15 minutes on 2 cores): an SFT
candidate trained on simulated trainers' rewrites against one trained on what simulated end users liked, at the
same number of judgments, on held-out correctness and the gate's capability figures, paired.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from scipy import stats

from app.annotation.api import build_annotation_api
from app.annotation.gold import ensure_gold, route_disagreement
from app.annotation.queue import QueueConfig, Task, TaskQueue
from app.annotation.roles import RoleStore
from feedback.settings import Settings
from infra.ports import free_port
from pipelines.agreement import agreement, trust_scores

K = 3


def _rank(true_order: list[str], p: float, rng: random.Random) -> dict[str, int]:
    order = list(true_order)
    if rng.random() >= p:
        rng.shuffle(order)
    return {a: i + 1 for i, a in enumerate(order)}


def simulated_alpha(accuracies: list[float], items: int = 4000, seed: int = 7) -> float | None:
    """Alpha of the annotator model itself: every trainer ranks the same ``items`` (no queue, no HTTP)."""
    rng = random.Random(seed)
    rows = []
    for i in range(items):
        true = [f"i{i}a{k}" for k in range(K)]
        rng.shuffle(true)
        for t, p in enumerate(accuracies):
            ranks = _rank(true, p, rng)
            answers = [{"answer_id": a, "rank": r} for a, r in ranks.items()]
            rows.append({"user_id": f"t{t}", "task_id": f"i{i}", "answers": answers})
    return agreement(rows)["alpha_ranking"]


def serve(queue: TaskQueue, roles: RoleStore) -> tuple[uvicorn.Server, threading.Thread, str]:
    api = FastAPI()
    api.include_router(build_annotation_api(queue, roles))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the annotation API did not start within 30 s")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def run(trainers: int, items: int, overlap: int, think_ms: float, gold: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    accuracies = [round(0.95 - 0.45 * i / max(trainers - 1, 1), 3) for i in range(trainers)]
    with tempfile.TemporaryDirectory(prefix="flywheel-labeling-") as tmp:
        s = Settings(home=Path(tmp) / "home")
        roles = RoleStore(s)
        queue = TaskQueue(s, config=QueueConfig(max_per_minute=10_000, gold_every=4))
        queue.judged_listeners.append(route_disagreement)
        ensure_gold(queue, n=gold)
        truth: dict[str, list[str]] = {}
        for i in range(items):
            ids = [f"a{k}" for k in range(K)]
            rng.shuffle(ids)
            truth[f"item-{i}"] = ids
            answers = [{"answer_id": a, "text": f"answer {a} to item {i}", "model_version": "base"} for a in ids]
            prompt = [{"role": "user", "content": f"question {i}"}]
            queue.add(Task(f"item-{i}", "compare", prompt, answers, conversation_id=f"c{i}", overlap=overlap))
        gold_ids = queue.gold()
        tokens = {f"t{t}": roles.grant(f"t{t}", "trainer") for t in range(trainers)}
        server, thread, url = serve(queue, roles)
        waits: list[float] = []
        done: dict[str, int] = {name: 0 for name in tokens}
        elapsed: dict[str, float] = {}
        lock = threading.Lock()

        failures: list[BaseException] = []

        def work(t: int) -> None:
            try:
                judge_all(t)
            except BaseException as e:  # re-raised after the join: a trainer's failure fails the benchmark
                failures.append(e)

        def judge_all(t: int) -> None:
            name, p = f"t{t}", accuracies[t]
            r = random.Random(seed * 1000 + t)
            headers = {"Authorization": f"Bearer {tokens[name]}"}
            start = time.monotonic()
            with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
                while True:
                    t0 = time.monotonic()
                    view = c.get("/annotation/next").json()["task"]
                    with lock:
                        waits.append((time.monotonic() - t0) * 1000)
                    if view is None:
                        break
                    tid = view["task_id"]
                    if tid in gold_ids:  # right answer first with probability p, else a coin flip
                        right = gold_ids[tid]
                        order = sorted(view["answer_ids"], key=lambda a: a != right)
                        ranks = _rank(order, p, r)
                    else:
                        ranks = _rank(truth[tid], p, r)
                    time.sleep(think_ms / 1000)
                    resp = c.post(
                        f"/annotation/tasks/{tid}/judgment", json={"ranks": ranks, "seconds": think_ms / 1000}
                    )
                    if resp.status_code != 200:
                        raise RuntimeError(f"{name} on {tid}: {resp.status_code} {resp.text}")
                    done[name] += 1
            elapsed[name] = time.monotonic() - start

        threads = [threading.Thread(target=work, args=(t,)) for t in range(trainers)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        server.should_exit = True
        thread.join(10)
        if failures:
            raise failures[0]
        rows = [
            {"user_id": who, "task_id": tid, "answers": [{"answer_id": a, "rank": k} for a, k in ranks.items()]}
            for tid in [*truth, *gold_ids]
            for who, ranks in queue.rankings(tid).items()
        ]
        measured = agreement([r for r in rows if r["task_id"] in truth])
        trust = trust_scores(rows, gold_ids)
        reviews = sum(1 for tid in truth if queue.get(f"review-{tid}") is not None)
        queue.close()
        roles.close()
    expected_gold = [p + (1 - p) / 2 for p in accuracies]
    recovered = [None if (a := trust[f"t{t}"].accuracy) is None else round(a, 3) for t in range(trainers)]
    sim = simulated_alpha(accuracies)
    return {
        "trainers": trainers,
        "items": items,
        "overlap": overlap,
        "gold_items": len(gold_ids),
        "accuracies": accuracies,
        "judgments": sum(done.values()),
        "tasks_per_hour": {n: round(done[n] / elapsed[n] * 3600) for n in sorted(done)},
        "next_task_p50_ms": round(statistics.median(waits), 1),
        "next_task_p95_ms": round(statistics.quantiles(waits, n=20)[-1], 1),
        "alpha_measured": measured["alpha_ranking"],
        "alpha_simulated": sim,
        "alpha_diff": None
        if sim is None or measured["alpha_ranking"] is None
        else round(measured["alpha_ranking"] - sim, 4),
        "gold_accuracy_expected": [round(x, 3) for x in expected_gold],
        "gold_accuracy_recovered": recovered,
        "gold_accuracy_mae": round(
            statistics.mean(abs(a - b) for a, b in zip(recovered, expected_gold, strict=True) if a is not None), 3
        ),  # fmt: skip
        "trust_rank_corr": round(
            float(stats.spearmanr(accuracies, [trust[f"t{t}"].score for t in range(trainers)]).statistic), 3
        ),  # fmt: skip
        "routed_to_review": reviews,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trainers", type=int, default=6)
    ap.add_argument("--items", type=int, default=80)
    ap.add_argument("--overlap", type=int, default=3)
    ap.add_argument("--gold", type=int, default=24)
    ap.add_argument("--think-ms", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--effect", action="store_true", help="also train and measure the model effect (~15 min)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = run(a.trainers, a.items, a.overlap, a.think_ms, a.gold, a.seed)
    if a.effect:
        from benchmarks import labeling_effect

        out["model_effect"] = labeling_effect.run(seed=a.seed, say=(lambda m: None) if a.json else print)
    if a.json:
        print(json.dumps(out))
        return
    print(f"{out['judgments']} judgments by {out['trainers']} simulated trainers on {out['items']} items (overlap "
          f"{out['overlap']}) and {out['gold_items']} gold items")  # fmt: skip
    print(f"next task: p50 {out['next_task_p50_ms']} ms, p95 {out['next_task_p95_ms']} ms (target < 300)")
    print(
        f"alpha (rankings): measured {out['alpha_measured']}, simulated {out['alpha_simulated']} (target: within 0.05)"
    )
    for t, p in enumerate(out["accuracies"]):
        print(f"  t{t}: p={p:.2f}  gold accuracy {out['gold_accuracy_recovered'][t]} (expected "
              f"{out['gold_accuracy_expected'][t]:.2f})  {out['tasks_per_hour'][f't{t}']} tasks/h")  # fmt: skip
    print(f"trust vs p: Spearman {out['trust_rank_corr']}; items routed to review: {out['routed_to_review']}")
    if "model_effect" in out:
        from benchmarks.labeling_effect import summary_lines

        print("model effect: " + "\n  ".join(summary_lines(out["model_effect"])))


if __name__ == "__main__":
    main()
