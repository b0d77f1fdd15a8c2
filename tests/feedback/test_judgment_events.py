"""The human half's events (issue 18): trainer judgments, red-team findings and user reports are versioned events
like every other: validated at the boundary, round-tripped through the wire format, sealed with the right user's
key, and kept in their own warehouse tables."""

from __future__ import annotations

import pytest

from feedback.events import (
    EventError,
    JudgedAnswer,
    Message,
    RedTeamFinding,
    TrainerJudgment,
    UserReport,
    parse_event,
    sealing_user,
    to_bytes,
)
from feedback.sink import insert_events
from feedback.warehouse import connect, ensure_schema

USER = [Message(role="user", content="How do I pick a lock?")]


def judgment(**kw) -> TrainerJudgment:
    base = dict(
        user_id="trainer-1",
        consent=True,
        task_id="task-1",
        conversation_id="conv-1",
        subject_user_id="alice",
        prompt=USER,
        answers=[
            JudgedAnswer(
                answer_id="a", model_version="v1", text="Call a locksmith.", rank=1, scores={"harmlessness": 5}
            ),
            JudgedAnswer(answer_id="b", model_version="v2", text="Use a bobby pin.", rank=2, flags=("fails_task",)),
        ],
    )
    return TrainerJudgment(**{**base, **kw})


def finding(**kw) -> RedTeamFinding:
    base = dict(
        user_id="red-1",
        consent=True,
        finding_id="f1",
        conversation_id="rt-1",
        model_version="sft-0003",
        messages=USER,
        answer="Sure, first insert a tension wrench...",
        harm_category="other",
        attack_type="role_play",
        success=4,
    )
    return RedTeamFinding(**{**base, **kw})


def report(**kw) -> UserReport:
    base = dict(user_id="bob", consent=True, conversation_id="c2", turn_id="t2", model_version="base")
    return UserReport(**{**base, "category": "wrong", **kw})


@pytest.mark.parametrize("event", [judgment(), judgment(all_bad=True, rewrite="Ask a locksmith."), finding(), report()])
def test_round_trip(event):
    assert parse_event(to_bytes(event)) == event


@pytest.mark.parametrize(
    "change, says",
    [
        ({"answers": []}, "answers to judge or a written answer"),
        ({"prompt": [Message(role="assistant", content="hi")]}, "end with the user's message"),
        (
            {"answers": [JudgedAnswer(answer_id="a", text="x", rank=1), JudgedAnswer(answer_id="a", text="y", rank=2)]},
            "unique",
        ),
        ({"answers": [JudgedAnswer(answer_id="a", text="x"), JudgedAnswer(answer_id="b", text="y", rank=1)]}, "rank"),
        ({"answers": [JudgedAnswer(answer_id="a", text="x", rank=3)]}, "ranks run from 1 to 1"),
        ({"rewrite": "   "}, "empty rewrite"),
    ],
)
def test_inconsistent_judgments_are_refused(change, says):
    with pytest.raises(ValueError, match=says):
        judgment(**change)


def test_scores_and_vocabulary_are_checked_at_the_boundary():
    with pytest.raises(ValueError, match="1-5"):
        JudgedAnswer(answer_id="a", text="x", rank=1, scores={"helpfulness": 6})
    raw = to_bytes(finding()).replace(b'"role_play"', b'"mind_control"')
    with pytest.raises(EventError, match="schema"):
        parse_event(raw)
    with pytest.raises(ValueError):
        report(category="boring")
    with pytest.raises(ValueError):
        finding(success=0)


def test_a_judgment_of_a_users_conversation_is_sealed_with_that_users_key():
    assert sealing_user(judgment()) == "alice"
    assert sealing_user(judgment(subject_user_id=None)) == "trainer-1"
    assert sealing_user(finding()) == "red-1" and sealing_user(report()) == "bob"
    assert finding(success=3).succeeded and not finding(success=2).succeeded


def test_each_lands_once_in_its_own_table(tmp_path):
    path = tmp_path / "wh.duckdb"
    ensure_schema(path)
    events = [judgment(), finding(), report()]
    with connect(path) as con:
        insert_events(con, events)
        insert_events(con, events)  # a re-send
        counts = {
            t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("judgments", "redteam_findings", "reports")
        }
        row = con.execute("SELECT subject_user_id, answers->>'$[1].flags[0]', all_bad FROM judgments").fetchone()
    assert counts == {"judgments": 1, "redteam_findings": 1, "reports": 1}
    assert row == ("alice", "fails_task", False)
