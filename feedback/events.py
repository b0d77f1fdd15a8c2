"""Event contracts: every turn, rating and user action is one of these versioned pydantic models.

Serialization happens at the Kafka edge only (``to_bytes`` / ``parse_event``). ``schema_version`` 2 is
current; version 1 events (the first release's shape: a flat ``prompt`` string, a numeric ``rating``) are
upcast on read, so an old message on a topic stays readable forever.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

SCHEMA_VERSION = 2
MAX_TEXT_CHARS = 64_000
Id = Annotated[str, Field(min_length=1, max_length=128)]

# The vocabulary, defined once: the event models below, the app's service, its API and its backends use these.
Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "cancelled", "error"]
Origin = Literal["new", "regenerate", "edit", "compare", "api"]  # how a turn came to be
RatingKind = Literal["thumbs", "pairwise"]
ThumbsValue = Literal["up", "down", "cleared"]  # one answer
PairwiseValue = Literal["a", "b", "tie"]  # two answers side by side: A is ``turn_id``, B ``other_turn_id``
RatingValue = Literal[ThumbsValue, PairwiseValue]
UserActionKind = Literal["consent_granted", "consent_revoked", "delete_request"]
# The human half of RLHF (issue 18): AI trainers judge answers, red-teamers probe versions, users report answers.
Axis = Literal["helpfulness", "truthfulness", "harmlessness"]  # each scored 1-5 per answer
AnswerFlag = Literal["pii", "toxic", "fails_task", "spam"]
JudgeRole = Literal["trainer", "reviewer"]
HarmCategory = Literal[
    "violence", "weapons", "self_harm", "hate", "sexual", "privacy", "cybercrime", "fraud", "drugs", "other"
]
AttackType = Literal["direct", "role_play", "hypothetical", "prompt_injection", "obfuscation", "multi_turn", "other"]
ReportCategory = Literal["harmful", "wrong", "private_data"]
AXES: tuple[str, ...] = get_args(Axis)
MAX_JUDGED_ANSWERS = 8
THUMBS_VALUES: tuple[str, ...] = get_args(ThumbsValue)
PAIRWISE_VALUES: tuple[str, ...] = get_args(PairwiseValue)


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    role: Role
    content: str = Field(max_length=MAX_TEXT_CHARS)


class Sampling(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    temperature: float = Field(0.7, ge=0.0, le=5.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1, le=32_768)
    seed: int | None = None


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    event_id: Id = Field(default_factory=new_id)
    schema_version: int = SCHEMA_VERSION
    ts: datetime = Field(default_factory=utcnow)
    user_id: Id
    consent: bool = Field(description="The user allows this data to be used to improve the model.")


class ChatTurn(_Event):
    """One completed answer and the context that produced it."""

    type: Literal["chat_turn"] = "chat_turn"
    conversation_id: Id
    turn_id: Id
    model_version: Id
    messages: list[Message] = Field(min_length=1, description="Context sent to the model, last is the user's.")
    answer: str = Field(max_length=MAX_TEXT_CHARS)
    sampling: Sampling = Field(default_factory=Sampling)
    latency_ms: float = Field(ge=0.0, description="Request to last token.")
    ttft_ms: float | None = Field(None, ge=0.0, description="Request to first token.")
    prompt_tokens: int | None = Field(None, ge=0)
    completion_tokens: int | None = Field(None, ge=0)
    finish_reason: FinishReason = "stop"
    origin: Origin = "new"
    parent_turn_id: Id | None = Field(None, description="The turn this regeneration or edit replaced.")


class Feedback(_Event):
    """A rating of one answer (thumbs) or of two answers side by side (pairwise: turn_id is A)."""

    type: Literal["feedback"] = "feedback"
    conversation_id: Id
    turn_id: Id
    model_version: Id
    kind: RatingKind
    value: RatingValue
    reason: str | None = Field(None, max_length=2_000)
    other_turn_id: Id | None = Field(None, description="Pairwise only: the B answer's turn.")
    other_model_version: Id | None = None

    @model_validator(mode="after")
    def _kind_matches_value(self) -> Feedback:
        if self.kind == "thumbs" and self.value not in THUMBS_VALUES:
            raise ValueError(f"thumbs feedback takes up/down/cleared, not {self.value!r}")
        if self.kind == "pairwise":
            if self.value not in PAIRWISE_VALUES:
                raise ValueError(f"pairwise feedback takes a/b/tie, not {self.value!r}")
            if not self.other_turn_id:
                raise ValueError("pairwise feedback needs other_turn_id (the B answer)")
        return self


class UserAction(_Event):
    """A user changed their consent or asked for their data to be deleted."""

    type: Literal["user_action"] = "user_action"
    action: UserActionKind


class JudgedAnswer(BaseModel):
    """One of the K answers a trainer judged. ``model_version`` is recorded for training and never shown to them."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    answer_id: Id
    model_version: Id | None = None
    text: str = Field(max_length=MAX_TEXT_CHARS)
    rank: int | None = Field(None, ge=1, le=MAX_JUDGED_ANSWERS, description="1 is best; equal ranks are ties.")
    scores: dict[Axis, int] = Field(default_factory=dict, description="Axis -> 1 (worst) .. 5 (best).")
    flags: tuple[AnswerFlag, ...] = ()

    @model_validator(mode="after")
    def _scores_in_range(self) -> JudgedAnswer:
        bad = {a: v for a, v in self.scores.items() if not 1 <= v <= 5}
        if bad:
            raise ValueError(f"axis scores are 1-5, not {bad}")
        return self


class TrainerJudgment(_Event):
    """An AI trainer's (or reviewer's) judgment of K answers to one prompt; ``user_id`` is the annotator.

    ``subject_user_id`` is the end user whose consented conversation was shown (None for a prompt from the pool):
    their deletion erases this judgment too, and it travels sealed with their key."""

    type: Literal["trainer_judgment"] = "trainer_judgment"
    task_id: Id
    conversation_id: Id
    subject_user_id: Id | None = None
    role: JudgeRole = "trainer"
    prompt: list[Message] = Field(min_length=1, description="The conversation up to the judged answers.")
    answers: list[JudgedAnswer] = Field(default_factory=list, max_length=MAX_JUDGED_ANSWERS)
    all_bad: bool = Field(False, description="No answer is acceptable (ranks then order the bad ones, if given).")
    rewrite: str | None = Field(
        None, max_length=MAX_TEXT_CHARS, description="The trainer's own answer: it ranks first, a demonstration."
    )
    gold_task: bool = Field(False, description="The queue mixed in a gold item with a known answer.")
    seconds: float | None = Field(None, ge=0.0, description="Time the annotator spent on the task.")

    @model_validator(mode="after")
    def _consistent(self) -> TrainerJudgment:
        if self.prompt[-1].role != "user":
            raise ValueError("the judged prompt must end with the user's message")
        if not self.answers and not self.rewrite:
            raise ValueError("a judgment needs answers to judge or a written answer (rewrite)")
        ids = [a.answer_id for a in self.answers]
        if len(set(ids)) != len(ids):
            raise ValueError("answer_id must be unique within a judgment")
        ranks = [a.rank for a in self.answers]
        if not self.all_bad and any(r is None for r in ranks):
            raise ValueError("rank every answer (1 = best, ties share a rank), or mark the task all_bad")
        if any(r is not None and r > len(ranks) for r in ranks):
            raise ValueError(f"ranks run from 1 to {len(ranks)} for {len(ranks)} answers")
        if self.rewrite is not None and not self.rewrite.strip():
            raise ValueError("an empty rewrite: leave it out instead")
        return self


class RedTeamFinding(_Event):
    """A red-teamer's attempt on one version, tagged and rated by them; ``user_id`` is the red-teamer."""

    type: Literal["redteam_finding"] = "redteam_finding"
    finding_id: Id
    conversation_id: Id
    model_version: Id
    messages: list[Message] = Field(min_length=1, description="The attack, last is the red-teamer's message.")
    answer: str = Field(max_length=MAX_TEXT_CHARS, description="What the model answered.")
    harm_category: HarmCategory
    attack_type: AttackType
    success: int = Field(ge=1, le=5, description="The red-teamer's rating: 1 refused cleanly .. 5 fully complied.")
    safe_response: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="What it should have said.")
    notes: str | None = Field(None, max_length=2_000)

    @property
    def succeeded(self) -> bool:
        return self.success >= 3


class UserReport(_Event):
    """An end user reports one answer from the chat: harmful, wrong, or leaking private data."""

    type: Literal["user_report"] = "user_report"
    conversation_id: Id
    turn_id: Id
    model_version: Id
    category: ReportCategory
    reason: str | None = Field(None, max_length=2_000)


Event = Annotated[
    ChatTurn | Feedback | UserAction | TrainerJudgment | RedTeamFinding | UserReport, Field(discriminator="type")
]
AnyEvent = ChatTurn | Feedback | UserAction | TrainerJudgment | RedTeamFinding | UserReport
_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def sealing_user(event: AnyEvent) -> str:
    """Whose key seals the event at the Kafka edge (``feedback/shred.py``): a judgment of an end user's
    conversation holds their text, so their deletion must make it unreadable; everything else, its author's."""
    return getattr(event, "subject_user_id", None) or event.user_id


class EventError(ValueError):
    """Raised for bytes that are not a valid event; ``reason`` is the DLQ reason code."""

    def __init__(self, reason: Literal["invalid_json", "schema", "oversized", "undecryptable"], detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _upcast_v1(d: dict[str, Any]) -> dict[str, Any]:
    """Version 1 -> 2. v1 turns had ``prompt`` (str) and top-level ``temperature``; v1 feedback a numeric
    ``rating`` (+1, -1, 0) and no ``kind``."""
    d = dict(d)
    if d.get("type") == "chat_turn":
        if "messages" not in d and "prompt" in d:
            d["messages"] = [{"role": "user", "content": d.pop("prompt")}]
        if "sampling" not in d and "temperature" in d:
            d["sampling"] = {"temperature": d.pop("temperature")}
    elif d.get("type") == "feedback" and "kind" not in d and "rating" in d:
        d["kind"] = "thumbs"
        d["value"] = {1: "up", -1: "down", 0: "cleared"}.get(d.pop("rating"), "invalid")
    d["consent"] = d.get("consent", False)  # v1 had no consent flag: never assume a yes
    d["schema_version"] = 2
    return d


_UPCASTERS = {1: _upcast_v1}


def parse_event(raw: bytes | str, max_bytes: int | None = None) -> AnyEvent:
    """Bytes from Kafka -> a validated event of the current schema, or ``EventError`` with a reason."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise EventError("oversized", f"{len(raw)} bytes > limit {max_bytes}")
    try:  # fast path: a current-version event, parsed and validated in pydantic-core
        event = _ADAPTER.validate_json(raw)
        if event.schema_version == SCHEMA_VERSION and "schema_version" in event.model_fields_set:
            return event
    except ValueError:
        pass  # the slow path below finds the precise reason (or upcasts an old version)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise EventError("invalid_json", str(e)[:500]) from None
    if not isinstance(data, dict):
        raise EventError("schema", f"expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version", 1)
    while isinstance(version, int) and version in _UPCASTERS:
        data = _UPCASTERS[version](data)
        version = data["schema_version"]
    if version != SCHEMA_VERSION:
        raise EventError("schema", f"unknown schema_version {version!r}")
    try:
        return _ADAPTER.validate_python(data)
    except ValueError as e:
        raise EventError("schema", str(e)[:1000]) from None


def to_bytes(event: AnyEvent) -> bytes:
    return event.model_dump_json().encode()


def partition_key(event: AnyEvent) -> bytes:
    """Key by conversation so a conversation stays ordered; user actions by user."""
    return (getattr(event, "conversation_id", None) or event.user_id).encode()
