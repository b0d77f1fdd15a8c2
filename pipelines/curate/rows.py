"""The shapes curation passes between its stages and writes out: typed rows, per-stage counts, table formats.

Its own idea because every stage reads or writes these and none owns them: the relational stages produce
``Turn``/``RatedTurn``/``Choice`` inside a ``Usable``; the builders make ``SftRow``/``KtoRow``/``PairRow``/``PromptRow``
(TRL's dataset formats); every stage reports a ``StageCount``; ``LAYOUT`` and ``SCHEMAS`` say which Parquet files
a snapshot holds and their columns; ``Curated`` is what ``curate()`` hands to ``pipelines/snapshots.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypedDict

import pyarrow as pa

# table -> splits written; prompts/train feeds online RL (GRPO), eval_prompts/eval is the held-out set.
LAYOUT: dict[str, tuple[str, ...]] = {
    "sft": ("train", "eval"),
    "kto": ("train", "eval"),
    "pairs": ("train", "eval"),
    "prompts": ("train",),
    "eval_prompts": ("eval",),
    # red-teamers' findings: train -> the recipes' safety mix, eval -> the gate's red-team suite (never both)
    "redteam": ("train", "eval"),
}
_MSG = pa.struct([("role", pa.string()), ("content", pa.string())])
_MSGS = pa.list_(_MSG)
# Where a training row came from: ``source`` (``user``: an end user's thumbs, regeneration or A/B choice;
# ``trainer`` / ``reviewer``: a judgment, ``pipelines/curate/judgments.py``), ``judge`` (the annotator's hash; null
# for users' rows) and ``weight`` (how much a recipe should count it: ``CurateConfig.judgment_*``).
_PROVENANCE = [("source", pa.string()), ("judge", pa.string()), ("weight", pa.float64())]
SCHEMAS: dict[str, pa.Schema] = {
    "sft": pa.schema([("messages", _MSGS), ("model_version", pa.string()), *_PROVENANCE]),
    "kto": pa.schema(
        [("prompt", _MSGS), ("completion", _MSGS), ("label", pa.bool_()), ("model_version", pa.string()), *_PROVENANCE]
    ),
    "pairs": pa.schema(
        [
            ("prompt", _MSGS),
            ("chosen", _MSGS),
            ("rejected", _MSGS),
            ("model_version", pa.string()),
            ("rejected_model_version", pa.string()),
            *_PROVENANCE,
        ]
    ),
    "prompts": pa.schema([("prompt", _MSGS), ("model_version", pa.string())]),
    "redteam": pa.schema(
        [
            ("prompt", _MSGS),
            ("safe_response", _MSGS),  # empty until someone writes it (a safe-response task)
            ("attacked_answer", _MSGS),
            ("harm_category", pa.string()),
            ("attack_type", pa.string()),
            ("success", pa.int32()),
            ("finding_id", pa.string()),
            ("model_version", pa.string()),
            *_PROVENANCE,
        ]
    ),
    "eval_prompts": pa.schema([("prompt", _MSGS), ("model_version", pa.string())]),
}

FINISHED = "stop"

Chat = list[dict[str, str]]  # [{"role": ..., "content": ...}], roles as in feedback.events.Role


@dataclass
class StageCount:
    stage: str
    rows_in: int
    rows_out: int
    dropped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "in": self.rows_in, "out": self.rows_out, "dropped": dict(self.dropped)}


@dataclass(frozen=True)
class Turn:
    """One usable answer: consented, not empty, not an error, not over-long. ``partial`` answers (cut at the
    token limit or by the client leaving) are kept: the person rated the text they saw."""

    turn_id: str
    conversation_id: str
    parent_turn_id: str | None
    origin: str
    model_version: str
    messages: list[dict[str, str]]
    answer: str
    finish_reason: str

    @property
    def partial(self) -> bool:
        return self.finish_reason != FINISHED


@dataclass(frozen=True)
class RatedTurn:
    """A turn with an unambiguous thumbs verdict (its latest thumbs from every rater agree)."""

    turn: Turn
    liked: bool
    raters: int


@dataclass(frozen=True)
class Choice:
    """An explicit side-by-side verdict between two usable turns (ties carry no preference and are not here)."""

    chosen: Turn
    rejected: Turn


@dataclass
class Usable:
    """What the relational stages leave for building examples."""

    turns: dict[str, Turn]
    rated: list[RatedTurn]
    choices: list[Choice]
    harm_reported: set[str]
    contributors: list[str]
    judged: list[Any] = field(default_factory=list)  # trainers' judgments (pipelines.curate.judgments.Judged)
    findings: list[dict[str, Any]] = field(default_factory=list)  # red-team rows (pipelines.curate.redteam)


@dataclass
class Curated:
    tables: dict[str, dict[str, list[dict[str, Any]]]]
    filters: list[StageCount]
    source: dict[str, Any]
    watermark: dict[str, Any]
    config: dict[str, Any]
    pii_engine: str
    pii_stats: dict[str, int]
    # sha256 of every user whose turns or ratings could reach this snapshot: a later deletion request of any of
    # them retires it (``pipelines.snapshots.retire_deleted``).
    contributors: list[str] = field(default_factory=list)
    # Ratings in -> training rows out, and where the rest went (``yield_report``).
    yield_report: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        return {t: {s: len(rows) for s, rows in splits.items()} for t, splits in self.tables.items()}


# The rows each training table holds (TRL's dataset formats, plus where each row came from). ``_convs`` are the
# conversations behind a row: the split stage keeps a row only if they all fall on one side, then drops the field.
class SftRow(TypedDict):
    messages: Chat
    model_version: str
    _convs: tuple[str, ...]


class KtoRow(TypedDict):
    prompt: Chat
    completion: Chat
    label: bool
    model_version: str
    _convs: tuple[str, ...]


class PairRow(TypedDict):
    prompt: Chat
    chosen: Chat
    rejected: Chat
    model_version: str
    rejected_model_version: str
    _convs: tuple[str, ...]


class PromptRow(TypedDict):
    prompt: Chat
    model_version: str
    _convs: tuple[str, ...]
