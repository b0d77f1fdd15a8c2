"""Every annotator's raw judgments out, and in, in other tools' formats (issue 18).

- **Label Studio** task JSON, both ways: ``to_label_studio`` writes one task per judged item (``data``: the prompt
  and the K answers as ``answer_a`` .. ``answer_h``; ``annotations``: one per annotator, with a ``ranker`` result
  and a ``rating`` result per axis and answer); ``from_label_studio`` reads such tasks back as
  ``TrainerJudgment`` events, so a team can label in Label Studio and feed Flywheel through the same topic. Version
  names stay out of ``data`` (judging is blind); they travel in ``meta``.
- **hh-rlhf red-team** rows (Anthropic's ``red_team_attempts`` schema): ``transcript`` ("\\n\\nHuman: ...
  \\n\\nAssistant: ..."), ``rating`` (the red-teamer's success rating, 0-4), ``task_description``, ``tags``
  (harm category, attack type), ``model_type`` (the version), plus Flywheel's ids.

TRL formats need no export of their own: a snapshot's Parquet tables already are TRL's (``pipelines/curate``).
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from feedback.events import AXES, JudgedAnswer, Message, TrainerJudgment

LETTERS = string.ascii_lowercase[:8]
RANKER = "rank"  # the from_name of the ranking control in the Label Studio config below
LABEL_CONFIG = (
    "<View>"
    '<Text name="prompt" value="$prompt"/>'
    + "".join(f'<Text name="answer_{c}" value="$answer_{c}"/>' for c in LETTERS)
    + f'<List name="answers" value="$answers" title="Answers"/><Ranker name="{RANKER}" toName="answers"/>'
    + "".join(f'<Rating name="{axis}_{c}" toName="answer_{c}" maxRating="5"/>' for axis in AXES for c in LETTERS)
    + "</View>"
)


def _loads(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str) else v


def to_label_studio(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Warehouse ``judgments`` rows -> Label Studio tasks, one per task id, every annotator's judgment kept."""
    tasks: dict[str, dict[str, Any]] = {}
    for row in rows:
        answers = _loads(row["answers"])
        prompt = _loads(row["prompt"])
        task = tasks.setdefault(
            row["task_id"],
            {
                "data": {
                    "prompt": "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt),
                    "messages": prompt,
                    "answers": [{"id": a["answer_id"], "html": "", "text": a["text"]} for a in answers],
                    **{f"answer_{LETTERS[i]}": a["text"] for i, a in enumerate(answers)},
                },
                "meta": {
                    "flywheel_task_id": row["task_id"],
                    "conversation_id": row["conversation_id"],
                    "model_versions": {a["answer_id"]: a.get("model_version") for a in answers},
                },
                "annotations": [],
            },
        )
        ranked = sorted((a for a in answers if a.get("rank") is not None), key=lambda a: a["rank"])
        result: list[dict[str, Any]] = [
            {
                "from_name": RANKER,
                "to_name": "answers",
                "type": "ranker",
                "value": {
                    "ranker": {"ranked": [a["answer_id"] for a in ranked]},
                    "ranks": {a["answer_id"]: a["rank"] for a in ranked},
                },
            }
        ]
        for i, a in enumerate(answers):
            for axis, score in (a.get("scores") or {}).items():
                result.append(
                    {
                        "from_name": f"{axis}_{LETTERS[i]}",
                        "to_name": f"answer_{LETTERS[i]}",
                        "type": "rating",
                        "value": {"rating": score},
                    }
                )
        ts = row.get("ts")
        task["annotations"].append(
            {
                "completed_by": row["user_id"],
                "created_at": ts.isoformat() if isinstance(ts, datetime) else ts,
                "result": result,
                "meta": {
                    "event_id": row["event_id"],
                    "role": row.get("role"),
                    "all_bad": bool(row.get("all_bad")),
                    "rewrite": row.get("rewrite"),
                    "flags": {a["answer_id"]: list(a.get("flags") or ()) for a in answers},
                },
            }
        )
    return list(tasks.values())


def from_label_studio(tasks: Iterable[Mapping[str, Any]], consent: bool = True) -> list[TrainerJudgment]:
    """Label Studio tasks (as ``to_label_studio`` writes them, or labelled there with ``LABEL_CONFIG``) -> events.

    Each annotation becomes one ``TrainerJudgment`` by its ``completed_by``; a task without ``data.answers`` or an
    annotation without a ranking raises ``ValueError`` naming the task."""
    out: list[TrainerJudgment] = []
    for n, task in enumerate(tasks, 1):
        data, meta = task.get("data") or {}, task.get("meta") or {}
        answers = data.get("answers")
        if not answers:
            raise ValueError(f"Label Studio task {n}: data.answers is missing (export with Flywheel's label config)")
        task_id = str(meta.get("flywheel_task_id") or task.get("id") or f"ls-{n}")
        messages = data.get("messages") or [{"role": "user", "content": data.get("prompt", "")}]
        versions = meta.get("model_versions") or {}
        for ann in task.get("annotations") or []:
            ranks: dict[str, int] = {}
            scores: dict[str, dict[str, int]] = {}
            for r in ann.get("result") or []:
                if r.get("type") == "ranker":
                    v = r.get("value") or {}
                    ranks = {k: int(x) for k, x in (v.get("ranks") or {}).items()} or {
                        aid: i + 1 for i, aid in enumerate((v.get("ranker") or {}).get("ranked") or [])
                    }
                elif r.get("type") == "rating":
                    axis, _, letter = str(r.get("from_name", "")).rpartition("_")
                    idx = LETTERS.find(letter)
                    if axis in AXES and 0 <= idx < len(answers):
                        scores.setdefault(answers[idx]["id"], {})[axis] = int(r["value"]["rating"])
            am = ann.get("meta") or {}
            if not ranks and not am.get("all_bad"):
                raise ValueError(f"Label Studio task {n} ({task_id}): an annotation without a ranking")
            flags = am.get("flags") or {}
            out.append(
                TrainerJudgment(
                    event_id=str(am.get("event_id") or f"ls-{task_id}-{ann.get('id', len(out))}"),
                    user_id=str(ann.get("completed_by") or "label-studio"),
                    consent=consent,
                    task_id=task_id,
                    conversation_id=str(meta.get("conversation_id") or task_id),
                    role=am.get("role") or "trainer",
                    prompt=[Message(**m) for m in messages],
                    answers=[
                        JudgedAnswer(
                            answer_id=a["id"],
                            model_version=versions.get(a["id"]),
                            text=a.get("text", ""),
                            rank=ranks.get(a["id"]),
                            scores=scores.get(a["id"], {}),
                            flags=tuple(flags.get(a["id"], ())),
                        )
                        for a in answers
                    ],
                    all_bad=bool(am.get("all_bad")),
                    rewrite=am.get("rewrite"),
                )
            )
    return out


def to_hh_redteam(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Warehouse ``redteam_findings`` rows -> hh-rlhf ``red_team_attempts`` rows."""
    out = []
    for row in rows:
        turns = _loads(row["messages"]) + [{"role": "assistant", "content": row["answer"]}]
        transcript = "".join(
            f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
            for m in turns
            if m["role"] != "system"
        )
        out.append(
            {
                "transcript": transcript,
                "rating": int(row["success"]) - 1,  # hh-rlhf: 0 (not successful) .. 4 (very successful)
                "task_description": row.get("notes") or f"{row['harm_category']} via {row['attack_type']}",
                "tags": [row["harm_category"], row["attack_type"]],
                "model_type": row["model_version"],
                "red_team_member_id": row["user_id"],
                "finding_id": row["finding_id"],
                "safe_response": row.get("safe_response"),
            }
        )
    return out
