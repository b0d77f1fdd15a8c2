"""The trainers' task queue (issue 18): what to judge next, drafts, skips, submissions, and the rules around them.

Task kinds and who may take them:

- ``compare``: a prompt (a consented conversation, or one from the pool) with K = 2-4 answers from different
  versions or samples; rank them (ties and "all bad" allowed), score each on helpfulness, truthfulness and
  harmlessness, flag, and optionally rewrite. Trainers and reviewers.
- ``demonstrate``: a prompt with no good answer; write one. Trainers.
- ``review``: items with low agreement, user reports, red-team findings. Reviewers.
- ``safe_response``: a successful red-team attack; write the safe answer. Trainers, red-teamers and reviewers.

Rules: nobody gets a task about their own submission (``author``) or their own conversation (``subject_user_id``);
an item is judged by ``overlap`` different annotators, then leaves the queue; a skip needs a reason and is final
for that annotator; a submission can be replaced within ``edit_window_s`` (a new event: curation keeps each
annotator's latest judgment of a task), never after; ``max_per_minute`` submissions per annotator. Gold tasks
(``gold_answer_id``, made by ``app/annotation/gold.py``) look like any other and come unannounced, one in
``gold_every``; a compare item whose ``overlap`` annotators disagree goes to review. Version names never leave this
module while a task is being judged (``TaskView``): the answers are labelled A-D, in an order shuffled per
annotator.

Routing by topic: a task carries a topic (a prompt-set kind such as ``fact`` or ``harmful``, ``report:<category>``,
``redteam:<harm category>``); a topic asked for in the request comes first, then the annotator's own topics
(``RoleStore.set_topics``: what they know best), then everything else. Within each, priority is
``weights[kind] * priority``, oldest first among equals.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from app.annotation.roles import Annotator, connect
from app.sqlite_columns import add_missing_columns
from feedback.events import JudgedAnswer, Message, TrainerJudgment
from feedback.settings import Settings

log = logging.getLogger(__name__)
TaskKind = Literal["compare", "demonstrate", "review", "safe_response"]
KINDS: tuple[str, ...] = get_args(TaskKind)
WHO: dict[str, frozenset[str]] = {
    "compare": frozenset({"trainer", "reviewer"}),
    "demonstrate": frozenset({"trainer"}),
    "review": frozenset({"reviewer"}),
    "safe_response": frozenset({"trainer", "red_teamer", "reviewer"}),
}
SKIP_REASONS = ("unclear prompt", "outside my expertise", "contains private data", "offensive content", "other")
LETTERS = "ABCDEFGH"

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY, kind TEXT NOT NULL, prompt TEXT NOT NULL, answers TEXT NOT NULL,
    conversation_id TEXT NOT NULL, subject_user_id TEXT, author TEXT, gold_answer_id TEXT,
    priority REAL NOT NULL DEFAULT 1.0, topic TEXT, overlap INTEGER NOT NULL DEFAULT 1, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    task_id TEXT NOT NULL, annotator TEXT NOT NULL, status TEXT NOT NULL, draft TEXT, skip_reason TEXT,
    updated_at REAL NOT NULL, submitted_at REAL, event_id TEXT, ranking TEXT, PRIMARY KEY (task_id, annotator));
CREATE INDEX IF NOT EXISTS assignments_by_annotator ON assignments (annotator, updated_at);
"""


class QueueError(ValueError):
    """A request the queue refuses; the message is one sentence for the annotator, ``status`` its HTTP status
    (400 bad input, 403 not yours to do, 404 no such task, 409 too late or already done, 429 too fast)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class QueueConfig:
    weights: dict[str, float] = field(
        default_factory=lambda: {"compare": 1.0, "demonstrate": 0.5, "review": 2.0, "safe_response": 1.5}
    )
    edit_window_s: float = 300.0
    max_per_minute: int = 10
    gold_every: int = 8  # every 8th task of an annotator is a gold one they have not done, while any is left
    review_below: float = 0.5  # agreement below this on a compare item sends it to review (app/annotation/gold.py)


@dataclass(frozen=True)
class Task:
    task_id: str
    kind: str
    prompt: list[dict[str, str]]
    answers: list[dict[str, Any]]  # answer_id, text, model_version
    conversation_id: str
    subject_user_id: str | None = None
    author: str | None = None
    gold_answer_id: str | None = None
    priority: float = 1.0
    topic: str | None = None
    overlap: int = 1


@dataclass(frozen=True)
class TaskView:
    """What an annotator sees: no version names, answers labelled A-D in an order of their own."""

    task_id: str
    kind: str
    prompt: list[dict[str, str]]
    labels: list[str]
    texts: list[str]
    answer_ids: list[str]  # in label order; never shown, sent back with the judgment


class TaskQueue:
    """Tasks and assignments in ``annotation.sqlite``; ``producer`` sends submitted judgments to Kafka."""

    def __init__(self, settings: Settings, producer: Any = None, config: QueueConfig | None = None):
        self._db = connect(settings)
        self._db.execute("PRAGMA secure_delete=ON")  # a forgotten user's text is overwritten, not left in free pages
        self._db.executescript(SCHEMA)
        add_missing_columns(self._db, "assignments", {"ranking": "TEXT"})  # a file from before disagreements routed
        self._lock = threading.Lock()
        self.producer = producer
        self.cfg = config or QueueConfig()
        self.judged_listeners: list[Any] = []  # called with (queue, task) after each recorded submission

    def close(self) -> None:
        self._db.close()

    # ---- tasks -------------------------------------------------------------------------------------------
    def add(self, task: Task, if_absent: bool = False) -> str | None:
        """Queue ``task``; its id. A task id already queued is a 409, or with ``if_absent`` None (two callers racing
        to add the same derived task, e.g. two last judgments of an item routed to review at once)."""
        if task.kind not in KINDS:
            raise QueueError(f"unknown task kind {task.kind!r}: use one of {', '.join(KINDS)}")
        if not task.prompt or task.prompt[-1].get("role") != "user":
            raise QueueError("a task's prompt must end with the user's message")
        n = len(task.answers)
        if task.kind in ("compare", "review") and not 2 <= n <= 4 and not (task.kind == "review" and n >= 1):
            raise QueueError(f"a {task.kind} task shows 2-4 answers, not {n}")
        if len({a["answer_id"] for a in task.answers}) != n:
            raise QueueError("answer ids must be unique within a task")
        if task.gold_answer_id and task.gold_answer_id not in {a["answer_id"] for a in task.answers}:
            raise QueueError("the gold answer must be one of the task's answers")
        if task.overlap < 1:
            raise QueueError("overlap is at least 1 (each item judged by that many annotators)")
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (task_id) DO NOTHING",
                (
                    task.task_id,
                    task.kind,
                    json.dumps(task.prompt),
                    json.dumps(task.answers),
                    task.conversation_id,
                    task.subject_user_id,
                    task.author,
                    task.gold_answer_id,
                    task.priority,
                    task.topic,
                    task.overlap,
                    time.time(),
                ),
            )
        if cur.rowcount == 0:
            if if_absent:
                return None
            raise QueueError(f"task {task.task_id} is already queued", 409)
        return task.task_id

    def get(self, task_id: str) -> Task | None:
        row = self._db.execute(
            "SELECT task_id, kind, prompt, answers, conversation_id, subject_user_id, author, gold_answer_id, "
            "priority, topic, overlap FROM tasks WHERE task_id = ?",
            (task_id,),
        ).fetchone()
        if row is None:
            return None
        return Task(row[0], row[1], json.loads(row[2]), json.loads(row[3]), *row[4:])

    def gold(self) -> dict[str, str]:
        """task_id -> the gold answer id, for trust scores (``pipelines/agreement.trust_scores``)."""
        return dict(self._db.execute("SELECT task_id, gold_answer_id FROM tasks WHERE gold_answer_id IS NOT NULL"))

    # ---- what next -----------------------------------------------------------------------------------------
    def next_for(self, who: Annotator, topic: str | None = None) -> TaskView | None:
        kinds = [k for k in KINDS if WHO[k] & set(who.roles)]
        if not kinds:
            return None
        gold = self._gold_due(who, kinds)
        if gold is not None:
            return self.view(gold, who.name)
        weights = " ".join(f"WHEN '{k}' THEN {float(self.cfg.weights.get(k, 1.0))}" for k in kinds)
        mine = ",".join("?" * max(1, len(who.topics)))
        rows = self._db.execute(
            f"""SELECT t.task_id FROM tasks t
                WHERE t.kind IN ({",".join("?" * len(kinds))})
                  AND coalesce(t.subject_user_id, '') <> ? AND coalesce(t.author, '') <> ?
                  AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.task_id = t.task_id AND a.annotator = ?
                                  AND a.status IN ('submitted', 'skipped'))
                  AND (SELECT count(*) FROM assignments a WHERE a.task_id = t.task_id AND a.status = 'submitted')
                      < t.overlap AND t.gold_answer_id IS NULL
                ORDER BY (coalesce(t.topic, '') = ?) DESC, (coalesce(t.topic, '') IN ({mine})) DESC,
                         (CASE t.kind {weights} END) * t.priority DESC, t.created_at, t.task_id
                LIMIT 1""",
            (*kinds, who.name, who.name, who.name, topic or "\x00", *(who.topics or ("\x00",))),
        ).fetchone()
        return self.view(rows[0], who.name) if rows else None

    def _gold_due(self, who: Annotator, kinds: list[str]) -> str | None:
        """A gold task this annotator has not seen, when their submissions so far make this their gold turn."""
        if "compare" not in kinds or self.cfg.gold_every < 1:
            return None
        done = self._db.execute(
            "SELECT count(*) FROM assignments WHERE annotator = ? AND status = 'submitted'", (who.name,)
        ).fetchone()[0]
        if done % self.cfg.gold_every != self.cfg.gold_every - 1:
            return None
        row = self._db.execute(
            """SELECT t.task_id FROM tasks t WHERE t.gold_answer_id IS NOT NULL AND NOT EXISTS
               (SELECT 1 FROM assignments a WHERE a.task_id = t.task_id AND a.annotator = ?) ORDER BY t.created_at
               LIMIT 1""",
            (who.name,),
        ).fetchone()
        return row[0] if row else None

    def rankings(self, task_id: str) -> dict[str, dict[str, int | None]]:
        """annotator -> their submitted ranks (answer_id -> rank; None unranked) for one task ("all bad": none)."""
        rows = self._db.execute(
            "SELECT annotator, ranking FROM assignments WHERE task_id = ? AND status = 'submitted' "
            "AND ranking IS NOT NULL",
            (task_id,),
        )
        return {who: json.loads(r) for who, r in rows}

    def view(self, task_id: str, annotator: str) -> TaskView:
        t = self.get(task_id)
        if t is None:
            raise QueueError(f"no task {task_id}", 404)
        order = list(t.answers)
        seed = int.from_bytes(hashlib.sha256(f"{task_id}:{annotator}".encode()).digest()[:8], "big")
        random.Random(seed).shuffle(order)  # position bias differs per annotator, and is not the version order
        return TaskView(
            t.task_id,
            t.kind,
            t.prompt,
            list(LETTERS[: len(order)]),
            [a["text"] for a in order],
            [a["answer_id"] for a in order],
        )

    # ---- drafts and skips ------------------------------------------------------------------------------------
    def save_draft(self, annotator: str, task_id: str, draft: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                """INSERT INTO assignments (task_id, annotator, status, draft, updated_at) VALUES (?, ?, 'open', ?, ?)
                   ON CONFLICT (task_id, annotator) DO UPDATE SET draft = excluded.draft,
                   updated_at = excluded.updated_at WHERE assignments.status = 'open'""",
                (task_id, annotator, json.dumps(draft), time.time()),
            )

    def draft(self, annotator: str, task_id: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT draft FROM assignments WHERE task_id = ? AND annotator = ?", (task_id, annotator)
        ).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def skip(self, annotator: str, task_id: str, reason: str) -> None:
        reason = (reason or "").strip()
        if not reason:
            raise QueueError(f"say why you skip: {', '.join(SKIP_REASONS)}, or your own words")
        with self._lock:
            self._db.execute(
                """INSERT INTO assignments (task_id, annotator, status, skip_reason, updated_at)
                   VALUES (?, ?, 'skipped', ?, ?) ON CONFLICT (task_id, annotator) DO UPDATE SET
                   status = 'skipped', skip_reason = excluded.skip_reason, updated_at = excluded.updated_at
                   WHERE assignments.status = 'open'""",
                (task_id, annotator, reason[:200], time.time()),
            )

    # ---- submissions -------------------------------------------------------------------------------------------
    def submit(
        self,
        who: Annotator,
        task_id: str,
        *,
        ranks: dict[str, int | None] | None = None,
        scores: dict[str, dict[str, int]] | None = None,
        flags: dict[str, list[str]] | None = None,
        all_bad: bool = False,
        rewrite: str | None = None,
        seconds: float | None = None,
    ) -> TrainerJudgment:
        """Validate, send (``producer.emit``: durable in the spool before this returns) and record a judgment."""
        t = self.get(task_id)
        if t is None:
            raise QueueError(f"no task {task_id}", 404)
        if not WHO[t.kind] & set(who.roles):
            raise QueueError(f"a {t.kind} task needs one of the roles {', '.join(sorted(WHO[t.kind]))}", 403)
        if who.name in (t.subject_user_id, t.author):
            raise QueueError("nobody judges their own conversation or submission", 403)
        now = time.time()
        with self._lock:
            prev = self._db.execute(
                "SELECT status, submitted_at FROM assignments WHERE task_id = ? AND annotator = ?", (task_id, who.name)
            ).fetchone()
            if prev and prev[0] == "submitted" and now - prev[1] > self.cfg.edit_window_s:
                raise QueueError(f"the {self.cfg.edit_window_s:.0f} s window to edit this judgment has closed", 409)
            if prev and prev[0] == "skipped":
                raise QueueError("you skipped this task", 409)
            recent = self._db.execute(
                "SELECT count(*) FROM assignments WHERE annotator = ? AND status = 'submitted' AND submitted_at > ?",
                (who.name, now - 60),
            ).fetchone()[0]
            if recent >= self.cfg.max_per_minute and not (prev and prev[0] == "submitted"):
                raise QueueError(f"at most {self.cfg.max_per_minute} submissions a minute: take a breath", 429)
            reviewer = t.kind == "review" or ("reviewer" in who.roles and "trainer" not in who.roles)
            role = "reviewer" if reviewer else "trainer"
            try:
                judgment = TrainerJudgment(
                    event_id=uuid.uuid4().hex,
                    user_id=who.name,
                    consent=True,
                    task_id=t.task_id,
                    conversation_id=t.conversation_id,
                    subject_user_id=t.subject_user_id,
                    role=role,
                    prompt=[Message(**m) for m in t.prompt],
                    answers=[
                        JudgedAnswer(
                            answer_id=a["answer_id"],
                            model_version=a.get("model_version"),
                            text=a["text"],
                            rank=(ranks or {}).get(a["answer_id"]),
                            scores=(scores or {}).get(a["answer_id"], {}),
                            flags=tuple((flags or {}).get(a["answer_id"], ())),
                        )
                        for a in t.answers
                    ],
                    all_bad=all_bad,
                    rewrite=rewrite.strip() if rewrite and rewrite.strip() else None,
                    gold_task=t.gold_answer_id is not None,
                    seconds=seconds,
                )
            except ValueError as e:
                first = e.errors()[0]["msg"] if hasattr(e, "errors") else str(e)
                raise QueueError(first.removeprefix("Value error, "), 422) from None
            if self.producer is not None:
                self.producer.emit(judgment)  # SpoolFull propagates: nothing recorded, the annotator retries
            self._db.execute(
                """INSERT INTO assignments (task_id, annotator, status, updated_at, submitted_at, event_id, ranking)
                   VALUES (?, ?, 'submitted', ?, ?, ?, ?) ON CONFLICT (task_id, annotator) DO UPDATE SET
                   status = 'submitted', draft = NULL, updated_at = excluded.updated_at,
                   submitted_at = coalesce(assignments.submitted_at, excluded.submitted_at),
                   event_id = excluded.event_id, ranking = excluded.ranking""",
                (task_id, who.name, now, now, judgment.event_id, None if all_bad else json.dumps(ranks or {})),
            )
        for listener in self.judged_listeners:  # e.g. app/annotation/gold.route_disagreement (wired by the server)
            try:
                listener(self, t)
            except Exception:  # the judgment is recorded and sent: a follow-up's failure is logged, not the caller's
                log.exception("after judging %s: %s failed", task_id, getattr(listener, "__name__", listener))
        return judgment

    # ---- deletion -----------------------------------------------------------------------------------------------
    def tasks_about(self, user_id: str) -> list[str]:
        """Ids of the tasks showing this user's conversation or made from their submission."""
        rows = self._db.execute("SELECT task_id FROM tasks WHERE subject_user_id = ? OR author = ?", (user_id, user_id))
        return [t for (t,) in rows]

    def forget_user(self, user_id: str, deleted: bool = True) -> int:
        """A user's withdrawal reaches the queue (``ChatService.withdrawal_listeners``). A revoked consent
        (``deleted`` False) removes every task showing their conversation (``subject_user_id``), with every
        annotator's drafts and assignments on it. A deletion also removes the tasks made from their submissions
        (``author``) and their own drafts and assignments as an annotator. Freed pages are overwritten and the WAL
        truncated, as in the session store. Returns the rows removed."""
        about, args = (
            ("subject_user_id = ? OR author = ?", (user_id, user_id))
            if deleted
            else ("subject_user_id = ?", (user_id,))
        )
        own, own_args = ("annotator = ? OR ", (user_id,)) if deleted else ("", ())
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                n = self._db.execute(
                    f"DELETE FROM assignments WHERE {own}task_id IN (SELECT task_id FROM tasks WHERE {about})",
                    (*own_args, *args),
                ).rowcount
                n += self._db.execute(f"DELETE FROM tasks WHERE {about}", args).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return n

    # ---- figures -----------------------------------------------------------------------------------------------
    def depth(self) -> dict[str, int]:
        """Open tasks per kind (fewer submissions than their overlap; gold tasks are not work waiting)."""
        rows = self._db.execute(
            """SELECT kind, count(*) FROM tasks t WHERE t.gold_answer_id IS NULL AND (SELECT count(*) FROM assignments a
               WHERE a.task_id = t.task_id AND a.status = 'submitted') < t.overlap GROUP BY kind"""
        ).fetchall()
        return {k: 0 for k in KINDS} | dict(rows)

    def throughput(self, since_s: float = 3600.0) -> dict[str, int]:
        """Submissions per annotator in the last ``since_s`` seconds."""
        rows = self._db.execute(
            "SELECT annotator, count(*) FROM assignments WHERE status = 'submitted' AND submitted_at > ? "
            "GROUP BY annotator ORDER BY 2 DESC",
            (time.time() - since_s,),
        ).fetchall()
        return dict(rows)

    def submissions_by_hour(self, hours: int = 24) -> list[tuple[float, int]]:
        """(hour start as a Unix time, submissions in that hour) for the last ``hours`` hours, oldest first."""
        now = time.time()
        start = (now // 3600 - hours + 1) * 3600
        counts = dict(
            self._db.execute(
                "SELECT CAST(submitted_at / 3600 AS INTEGER) * 3600, count(*) FROM assignments "
                "WHERE status = 'submitted' AND submitted_at >= ? GROUP BY 1",
                (start,),
            ).fetchall()
        )
        return [(start + 3600 * i, int(counts.get(int(start + 3600 * i), 0))) for i in range(hours)]


REPORT_PRIORITY = {"private_data": 3.0, "harmful": 2.5, "wrong": 1.5}


def queue_review(queue: TaskQueue, report: Any, context: tuple[list[dict[str, str]], str] | None) -> str:
    """A user's report becomes a review task (``ChatService.report_listeners``): the reported answer with the
    conversation before it when the app kept it. The reporter never reviews it (``subject_user_id``)."""
    prompt, answer = (
        context if context and context[0] else ([{"role": "user", "content": "(not stored: an API turn)"}], "")
    )
    if prompt[-1]["role"] != "user":
        prompt = [*prompt, {"role": "user", "content": "(the answer continues the conversation above)"}]
    return queue.add(
        Task(
            f"report-{report.event_id[:16]}",
            "review",
            prompt,
            [{"answer_id": report.turn_id, "text": answer or "(not stored)", "model_version": report.model_version}],
            conversation_id=report.conversation_id,
            subject_user_id=report.user_id,
            priority=REPORT_PRIORITY.get(report.category, 1.0),
            topic=f"report:{report.category}",
        )
    )


def queue_safe_response(queue: TaskQueue, finding: Any) -> str:
    """A successful red-team attack becomes a "write the safe response" task for someone other than its author."""
    return queue.add(
        Task(
            f"safe-{finding.finding_id[:12]}",
            "safe_response",
            [m.model_dump() for m in finding.messages],
            [{"answer_id": "attacked", "text": finding.answer, "model_version": finding.model_version}],
            conversation_id=finding.conversation_id,
            author=finding.user_id,
            priority=1.0 + finding.success / 5,
            topic=f"redteam:{finding.harm_category}",
        )
    )
