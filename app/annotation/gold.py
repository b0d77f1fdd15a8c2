"""Gold items and disagreements: the two ways the queue checks its own annotators (issue 18).

- **Gold items.** ``gold_tasks`` makes compare tasks whose best answer is known, from the shipped prompt set's
  training-split facts and sums (``cli/data/prompts.jsonl``: each item carries its accepted answers; its held-out
  split never becomes a task, so the gate's and the demo's held-out users stay unseen). Each shows a right answer
  and a wrong one of the same kind, in one plain form, so only correctness tells them apart. ``ensure_gold`` keeps
  them in the queue; the queue hands an annotator one in every ``QueueConfig.gold_every`` tasks, unannounced, and
  ``pipelines/agreement.trust_scores`` turns their rank-1 picks into accuracy and trust.
- **Disagreements.** When a compare item with ``overlap`` of 2 or more has all its judgments, ``agreement`` measures
  how far its annotators' rankings agree: over every pair of annotators and every pair of answers both ranked, 1
  when they order it the same way, 0 when opposite, 0.5 when one of them tied it. Below
  ``QueueConfig.review_below`` the item becomes a review task for a reviewer (``route_disagreement``), once.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from app.annotation.queue import Task, TaskQueue

PROMPTS_FILE = Path(__file__).resolve().parents[2] / "cli" / "data" / "prompts.jsonl"
GOLD_KINDS = ("fact", "arithmetic")
GOLD_PREFIX = "gold-"
REVIEW_PREFIX = "review-"


def gold_tasks(n: int = 24, seed: int = 0, path: Path = PROMPTS_FILE) -> list[Task]:
    """``n`` gold compare tasks (fewer when the set has fewer items), the same ones for the same seed."""
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    usable = [r for r in items if r.get("split") == "train" and r.get("kind") in GOLD_KINDS and r.get("accepted")]
    rng = random.Random(seed)
    rng.shuffle(usable)
    tasks = []
    for item in usable[:n]:
        right = item["accepted"][0]
        others = [
            r["accepted"][0] for r in usable if r["kind"] == item["kind"] and r["accepted"][0] not in item["accepted"]
        ]
        wrong = rng.choice(others)
        answers = [
            {"answer_id": "right", "text": f"The answer is {right}.", "model_version": None},
            {"answer_id": "wrong", "text": f"The answer is {wrong}.", "model_version": None},
        ]
        rng.shuffle(answers)  # stored order is not shown (TaskView shuffles per annotator), but keep it uninformative
        task_id = f"{GOLD_PREFIX}{item['id']}"
        prompt = [{"role": "user", "content": item["prompt"]}]
        tasks.append(
            Task(
                task_id, "compare", prompt, answers, conversation_id=task_id, gold_answer_id="right", topic=item["kind"]
            )
        )
    return tasks


def ensure_gold(queue: TaskQueue, n: int = 24, seed: int = 0) -> int:
    """Add the gold tasks the queue does not hold yet; returns how many were added."""
    added = 0
    for task in gold_tasks(n, seed):
        added += queue.add(task, if_absent=True) is not None
    return added


def agreement(rankings: dict[str, dict[str, int | None]]) -> float | None:
    """Pairwise ordinal agreement in [0, 1] of annotators' rankings (answer_id -> rank, lower is better); None when
    fewer than two annotators ranked two answers in common."""
    scores = []
    for a, b in itertools.combinations(sorted(rankings), 2):
        ra, rb = rankings[a], rankings[b]
        common = [x for x in ra if ra[x] is not None and rb.get(x) is not None]
        for x, y in itertools.combinations(common, 2):
            da, db = ra[x] - ra[y], rb[x] - rb[y]
            scores.append(0.5 if da == 0 or db == 0 else float((da > 0) == (db > 0)))
    return sum(scores) / len(scores) if scores else None


def route_disagreement(queue: TaskQueue, task: Task) -> str | None:
    """A ``TaskQueue.judged_listeners`` entry: when ``task`` (a compare item judged by 2 or more) has all its
    judgments and they agree less than ``review_below``, a review task with the same conversation and answers (for a
    reviewer who is not its subject); its id, or None."""
    if task.kind != "compare" or task.overlap < 2 or task.gold_answer_id is not None:
        return None
    ranks = queue.rankings(task.task_id)
    review_id = f"{REVIEW_PREFIX}{task.task_id}"
    if len(ranks) < task.overlap or queue.get(review_id) is not None:
        return None
    score = agreement(ranks)
    if score is None or score >= queue.cfg.review_below:
        return None
    review = Task(
        review_id,
        "review",
        task.prompt,
        task.answers,
        conversation_id=task.conversation_id,
        subject_user_id=task.subject_user_id,
        priority=1.0 + (queue.cfg.review_below - score),
        topic=task.topic,
    )
    return queue.add(review, if_absent=True)
