"""Event contracts and the durable spool: no services needed."""

import json

import pytest

from feedback.events import (
    ChatTurn,
    EventError,
    Feedback,
    Message,
    UserAction,
    parse_event,
    partition_key,
    to_bytes,
)
from feedback.spool import Spool, SpoolLocked


def turn(**kw) -> ChatTurn:
    base = dict(
        user_id="u1",
        consent=True,
        conversation_id="c1",
        turn_id="t1",
        model_version="base",
        messages=[Message(role="user", content="Hi <b>there</b>")],
        answer="Hello!",
        latency_ms=12.5,
    )
    return ChatTurn(**{**base, **kw})


@pytest.mark.parametrize(
    "event",
    [
        turn(),
        turn(parent_turn_id="t0", origin="regenerate", ttft_ms=3.0, prompt_tokens=5, completion_tokens=2),
        Feedback(
            user_id="u1",
            consent=True,
            conversation_id="c1",
            turn_id="t1",
            model_version="base",
            kind="thumbs",
            value="down",
            reason="wrong answer",
        ),
        Feedback(
            user_id="u1",
            consent=True,
            conversation_id="c1",
            turn_id="t1",
            model_version="base",
            kind="pairwise",
            value="tie",
            other_turn_id="t2",
            other_model_version="cand",
        ),
        UserAction(user_id="u1", consent=False, action="delete_request"),
    ],
)
def test_round_trip_every_type(event):
    back = parse_event(to_bytes(event))
    assert back == event
    assert type(back) is type(event)


def test_v1_events_stay_readable():
    v1_turn = {
        "schema_version": 1,
        "type": "chat_turn",
        "event_id": "e1",
        "ts": "2025-01-01T00:00:00Z",
        "user_id": "u",
        "conversation_id": "c",
        "turn_id": "t",
        "model_version": "base",
        "prompt": "hello?",
        "answer": "hi",
        "temperature": 0.2,
        "latency_ms": 10,
    }
    e = parse_event(json.dumps(v1_turn))
    assert isinstance(e, ChatTurn) and e.schema_version == 2
    assert e.messages[0].content == "hello?" and e.sampling.temperature == 0.2
    assert e.consent is False  # v1 had no consent: never assumed
    v1_fb = {
        "schema_version": 1,
        "type": "feedback",
        "event_id": "e2",
        "user_id": "u",
        "conversation_id": "c",
        "turn_id": "t",
        "model_version": "base",
        "rating": -1,
    }
    fb = parse_event(json.dumps(v1_fb).encode())
    assert isinstance(fb, Feedback) and fb.kind == "thumbs" and fb.value == "down"


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[1, 2]", "schema"),
        (json.dumps({"type": "chat_turn", "schema_version": 2, "user_id": "u"}).encode(), "schema"),
        (json.dumps({"type": "nope", "schema_version": 2}).encode(), "schema"),
        (json.dumps({"type": "feedback", "schema_version": 99}).encode(), "schema"),
        (b"x" * 2000, "oversized"),
    ],
)
def test_bad_bytes_give_a_reason(raw, reason):
    with pytest.raises(EventError) as err:
        parse_event(raw, max_bytes=1024)
    assert err.value.reason == reason


def test_feedback_kind_must_match_value():
    with pytest.raises(ValueError, match="thumbs"):
        Feedback(
            user_id="u", consent=True, conversation_id="c", turn_id="t", model_version="b", kind="thumbs", value="a"
        )
    with pytest.raises(ValueError, match="other_turn_id"):
        Feedback(
            user_id="u", consent=True, conversation_id="c", turn_id="t", model_version="b", kind="pairwise", value="a"
        )


def test_keyed_by_conversation():
    assert partition_key(turn(conversation_id="conv-9")) == b"conv-9"
    assert partition_key(UserAction(user_id="u7", consent=True, action="consent_granted")) == b"u7"


def test_spool_is_ordered_durable_and_exclusive(tmp_path):
    sp = Spool(tmp_path, "s")
    for i in range(10):
        sp.append("topic", b"k", f"v{i}".encode())
    with pytest.raises(SpoolLocked):
        Spool(tmp_path, "s")
    rows = sp.peek(4)
    assert [r[3] for r in rows] == [b"v0", b"v1", b"v2", b"v3"]
    sp.ack_through(rows[-1][0])
    sp.close()
    again = Spool(tmp_path, "s")  # a restarted process finds what was not acknowledged
    assert len(again) == 6
    assert again.peek(1)[0][3] == b"v4"
    again.close()


def test_spool_cuts_a_torn_record_and_spans_segments(tmp_path):
    sp = Spool(tmp_path, "s", segment_bytes=200)
    for i in range(20):
        sp.append("topic", None if i % 2 else b"k", f"value-{i}".encode())
    ids = [r[0] for r in sp.peek(100)]
    assert ids == sorted(ids) and len(ids) == 20
    sp.ack_through(ids[9])
    sp.close()
    last = max((tmp_path / "s").glob("*.log"), key=lambda p: int(p.stem))
    with open(last, "ab") as f:  # a crash in the middle of a write
        f.write(b"\x07\x00\x00\x00\x05\x00partial")
    again = Spool(tmp_path, "s", segment_bytes=200)
    rows = again.peek(100)
    assert len(again) == 10 and [r[3] for r in rows] == [f"value-{i}".encode() for i in range(10, 20)]
    assert rows[1][2] is None and rows[0][2] == b"k"
    again.append("topic", b"k", b"after")
    assert again.peek(100)[-1][3] == b"after"
    again.close()
