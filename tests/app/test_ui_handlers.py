"""The UI's handlers called one by one, as Gradio calls them, against the real service and model (no browser):
stop, the refusal of a second answer in the same tab, regenerate-then-keep, and conversations that belong to
someone else."""

from __future__ import annotations

import asyncio

import gradio as gr
import pytest

from app.sessions import COOKIE_NAME
from app.ui.chat import STILL_ANSWERING, ChatHandlers
from app.ui.context import UIContext
from app.ui.conversations import ConversationHandlers
from app.ui.render import status_md
from app.ui.state import new_chat
from feedback.events import Feedback
from tests.app.conftest import read_events

pytestmark = pytest.mark.integration


def request_of(live, user_id: str, tab: str) -> gr.Request:
    """What Gradio hands a handler: the tab's session hash and the browser's signed cookie."""
    return gr.Request(session_hash=tab, cookies={COOKIE_NAME: live.service.sessions.sign(user_id)})


async def drain(agen) -> list[tuple]:
    return [out async for out in agen]


def test_stop_ends_the_answer_as_cancelled_and_a_second_send_in_the_tab_is_refused(live):
    chat = ChatHandlers(UIContext(live.service, max_new_tokens=200))
    me = request_of(live, "u-stopper", "tab-1")
    st = new_chat()

    async def scenario():
        first = chat.send("Write a long story about a lighthouse keeper.", st, me)
        outs = [await anext(first), await anext(first)]  # the answer started and streams
        refused = await drain(chat.send("Another question", st, me))
        await chat.stop(me)
        outs += await drain(first)
        return outs, refused

    outs, refused = asyncio.run(scenario())
    assert refused[0][3] == status_md(STILL_ANSWERING)
    answer = st["messages"][-1]
    assert answer["finish"] == "cancelled" and answer["done"] and len(st["messages"]) == 2
    final = outs[-1]
    assert final[5]["interactive"] is True and final[6]["visible"] is False  # Send back, Stop hidden
    assert live.service.sessions.load_conversation("u-stopper", st["conversation_id"])[-1]["finish"] == "cancelled"


def test_a_send_right_after_the_buttons_come_back_is_answered(live):
    """The last output of a stopped answer gives Send back; the person may press it before Gradio finishes the
    handler. That send was refused as "still being written" and the message dropped (a CI run waited 120 s for an
    answer that was never asked for)."""
    chat = ChatHandlers(UIContext(live.service, max_new_tokens=200))
    me = request_of(live, "u-quick", "tab-4")
    st = new_chat()

    async def scenario():
        first = chat.send("Write a long story about a lighthouse keeper.", st, me)
        await anext(first), await anext(first)  # the answer streams
        await chat.stop(me)
        while True:  # up to the output that gives Send back, and not a step further (Gradio has not closed it yet)
            out = await anext(first)
            if isinstance(out[5], dict) and out[5].get("interactive") is True:
                break
        second = await drain(chat.send("Name a fruit.", st, me))
        await drain(first)  # Gradio closes the first handler now
        return second

    second = asyncio.run(scenario())
    assert all(out[3] != status_md(STILL_ANSWERING) for out in second), "the second send was refused"
    assert [m["role"] for m in st["messages"]] == ["user", "assistant", "user", "assistant"]
    assert st["messages"][-1]["done"] and st["messages"][-1]["finish"] in ("stop", "length")


def test_regenerate_then_keep_the_previous_answer_restores_it_and_records_one_preference(live, settings):
    chat = ChatHandlers(UIContext(live.service, max_new_tokens=12))
    me = request_of(live, "u-keeper", "tab-2")
    st = new_chat()
    asyncio.run(drain(chat.send("Name a fruit.", st, me)))
    old = dict(st["messages"][1])
    chat.like(st, gr.LikeData(None, {"index": 1, "value": old["content"], "liked": False}), me)
    assert st["messages"][1]["rating"] == "down"

    asyncio.run(drain(chat.retry(st, gr.RetryData(None, {"index": 0, "value": "Name a fruit."}), me)))
    new = st["messages"][1]
    assert new["turn_id"] != old["turn_id"] and new["rating"] is None and st["previous"]["turn_id"] == old["turn_id"]

    out = chat.keep("previous", st, me)
    assert st["messages"][1]["turn_id"] == old["turn_id"] and st["messages"][1]["rating"] == "down"
    assert st["previous"] is None and out[8]["visible"] is False
    assert out[0]["feedback_value"] == ["Dislike"]
    assert chat.keep("previous", st, me)[3] == ""  # nothing left to choose: no second preference

    def prefs(evs: list) -> list:
        return [e for e in evs if isinstance(e, Feedback) and e.kind == "pairwise"]

    pair = prefs(read_events(settings, settings.topic_feedback, lambda evs: bool(prefs(evs))))
    assert [(p.turn_id, p.value, p.other_turn_id) for p in pair] == [(old["turn_id"], "a", new["turn_id"])]


def test_conversations_of_someone_else_cannot_be_opened_renamed_or_deleted(live):
    side = ConversationHandlers(UIContext(live.service))
    live.service.sessions.save_conversation("u-owner", "c-1", [{"role": "user", "content": "mine"}])
    other = request_of(live, "u-other", "tab-3")
    theirs = {**new_chat(), "conversation_id": "c-1"}
    assert "not available" in side.open("c-1", other)[2]
    assert "not available" in side.rename("Taken", theirs, other)[2]
    assert "not available" in side.delete(theirs, other)[4]
    assert live.service.sessions.list_conversations("u-owner") == [("mine", "c-1")]
