"""Unit tests of the app's pure parts: input limits, sticky routing, signed users, ownership.
No services, no model."""

from __future__ import annotations

import collections

import pytest

from app.router import ReleasePlan, user_point
from app.sessions import Sessions, TurnRecord, api_user_id
from app.validation import (
    DEFAULT_LIMITS,
    MAX_MESSAGE_CHARS,
    InputError,
    check_conversation,
    clean_reason,
    clean_text,
)
from feedback.settings import Settings


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("   \n\t ", "empty"),
        ("x" * (MAX_MESSAGE_CHARS + 1), f"limit is {MAX_MESSAGE_CHARS:,}"),
        ("bell\x07", "control characters (U+0007)"),
        ("nul\x00byte", "U+0000"),
        (None, "must be text"),
    ],
)
def test_bad_text_gets_a_polite_message(text, fragment):
    with pytest.raises(InputError) as e:
        clean_text(text)
    assert fragment in e.value.message
    assert "Traceback" not in e.value.message


def test_good_text_is_normalised_and_keeps_newlines_and_unicode():
    assert clean_text("  héllo\r\nworld 👍\t ") == "héllo\nworld 👍"
    assert clean_reason("   ") is None
    assert clean_reason(" vague ") == "vague"


def test_conversation_limits():
    with pytest.raises(InputError, match="empty"):
        check_conversation([])
    too_many = [{"role": "user", "content": "hi"}] * (DEFAULT_LIMITS.conversation_messages + 1)
    with pytest.raises(InputError, match="too long"):
        check_conversation(too_many)
    long_chat = [{"role": "user", "content": "y" * 4000}, {"role": "assistant", "content": "z" * 8000}] * 2 + [
        {"role": "user", "content": "more"}
    ]
    with pytest.raises(InputError, match="too long"):
        check_conversation(long_chat)
    with pytest.raises(InputError, match="last message"):
        check_conversation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(InputError, match="role"):
        check_conversation([{"role": "tool", "content": "a"}])
    blocks = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert check_conversation(blocks) == [{"role": "user", "content": "ab"}]


def test_assignment_is_sticky_weighted_and_monotone_under_a_ramp():
    users = [f"u-{i}" for i in range(4000)]
    canary = ReleasePlan.weighted({"base": 0.9, "cand": 0.1})
    ramp = ReleasePlan.weighted({"base": 0.5, "cand": 0.5})
    counts = collections.Counter(canary.pick(u) for u in users)
    assert 300 < counts["cand"] < 500
    assert all(canary.pick(u) == canary.pick(u) for u in users[:100])
    # Ramping up only moves users from base to the candidate, never back.
    assert all(ramp.pick(u) == "cand" for u in users if canary.pick(u) == "cand")
    assert ReleasePlan.single("base").pick("anyone") == "base"
    assert 0 <= user_point("x") < 1 and user_point("x") != user_point("x", salt="s")
    with pytest.raises(ValueError):
        ReleasePlan.weighted({"a": 0.0})
    with pytest.raises(ValueError):
        ReleasePlan(variants=[{"model_version": "a", "weight": 1}, {"model_version": "a", "weight": 1}])


def test_signed_user_cookie_and_turn_ownership(tmp_path):
    s = Sessions(Settings(home=tmp_path))
    uid = s.new_user_id()
    token = s.sign(uid)
    assert s.unsign(token) == uid
    assert s.unsign(token[:-2] + "xx") is None
    assert s.unsign(Sessions(Settings(home=tmp_path / "other")).sign(uid)) is None  # another secret
    assert s.unsign(s.sign("api:mallory")) is None  # only browser ids travel in cookies
    s.record_turn(TurnRecord("t1", uid, "c1", "base"))
    assert s.owned_turn(uid, "t1").model_version == "base"
    assert s.owned_turn("u-someone-else", "t1") is None
    assert api_user_id(None) == "api:anonymous" and api_user_id("bob") == "api:bob"
    assert not s.consent(uid)
    assert s.set_consent(uid, True) and s.consent(uid) and not s.set_consent(uid, True)
    s.save_conversation(uid, "c1", [{"role": "user", "content": "Hello   there"}])
    assert s.list_conversations(uid) == [("Hello there", "c1")]
    assert s.load_conversation("u-other", "c1") is None
    # Secrets persist: a new process signs the same way.
    assert Sessions(Settings(home=tmp_path)).unsign(token) == uid
