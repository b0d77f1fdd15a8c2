"""The chat tab's handlers: send, stop, continue, regenerate (and keep one of two answers), edit, undo, thumbs.

Every streaming handler yields one ``ChatView`` per step: what changes on screen, ``gr.skip()`` for the rest.
While an answer streams, Send is disabled and Stop shown; Stop sets this tab's stop request, and the stream
ends at the next token as "cancelled" (the slot is freed, the turn recorded), so the same handler that
started the answer also finishes it: footer, saved conversation, buttons back. The chatbot's value always
goes out with its ``feedback_value``, so a thumb can only show on the answer it was given to.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, get_args

import gradio as gr

from app.service import NotYours, TurnStream
from app.ui.context import SOMETHING_WRONG, UIContext, error_sentence
from app.ui.render import display, feedback_values, status_md
from app.ui.state import Chat, Message, context, last_answer, replaced_turn, user_message_at
from app.validation import InputError, clean_reason, clean_text, content_text
from feedback.events import ReportCategory

REPORT_CATEGORIES = get_args(ReportCategory)

CONTINUE_PROMPT = "Continue."
STILL_ANSWERING = "An answer is still being written: wait for it or press Stop."
RATE_WHEN_DONE = "Rate the answer once it is finished."


def _skip() -> Any:
    return field(default_factory=gr.skip)


@dataclass
class ChatView:
    """The outputs of a chat event, in the order ``layout`` wires them."""

    chatbot: Any = _skip()
    state: Any = _skip()
    msg: Any = _skip()
    status: Any = _skip()
    history: Any = _skip()
    send: Any = _skip()
    stop: Any = _skip()
    cont: Any = _skip()
    keep: Any = _skip()
    reason: Any = _skip()

    def out(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)


def chatbot_update(st: Chat) -> dict:
    return gr.update(value=display(st["messages"]), feedback_value=feedback_values(st["messages"]))


def streaming_controls() -> dict[str, Any]:
    return {
        "send": gr.update(interactive=False),
        "stop": gr.update(visible=True),
        "cont": gr.update(visible=False),
        "keep": gr.update(visible=False),
        "reason": gr.update(visible=False),
    }


def idle_controls(st: Chat) -> dict[str, Any]:
    """Send back; Continue only under an answer cut at the length limit; the keep choice after a regeneration."""
    last = last_answer(st["messages"])
    return {
        "send": gr.update(interactive=True),
        "stop": gr.update(visible=False),
        "cont": gr.update(visible=bool(last and last.get("finish") == "length")),
        "keep": gr.update(visible=st.get("previous") is not None and last is not None),
    }


class ChatHandlers:
    def __init__(self, ctx: UIContext):
        self.ctx = ctx

    # ---- one answer --------------------------------------------------------------------------------
    async def answer(
        self, st: Chat, uid: str, tab: str, origin: str, parent: str | None, snapshot: list[Message], restore: Any
    ) -> AsyncIterator[tuple]:
        """Stream one answer to the last user message; on failure put ``snapshot`` back and say why."""
        if tab in self.ctx.stops:
            st["messages"] = snapshot
            if origin == "regenerate":
                st["previous"] = None
            yield ChatView(chatbot_update(st), st, status=status_md(STILL_ANSWERING)).out()
            return
        stop = self.ctx.stops[tab] = asyncio.Event()
        try:
            try:
                turn: TurnStream = await self.ctx.service.start_turn(
                    user_id=uid,
                    conversation_id=st["conversation_id"],
                    messages=context(st["messages"]),
                    sampling=self.ctx.sampling(),
                    origin=origin,
                    surface="ui",
                    parent_turn_id=parent,
                )
            except Exception as e:  # noqa: BLE001 - input, busy, or a failing backend: a sentence, not a trace
                st["messages"] = snapshot
                if origin == "regenerate":
                    st["previous"] = None  # the old answer is back in place: there is nothing to choose between
                yield ChatView(chatbot_update(st), st, restore, status_md(error_sentence(e)), **idle_controls(st)).out()
                return
            reply: Message = {
                "role": "assistant",
                "content": "",
                "turn_id": turn.turn_id,
                "model_version": turn.model_version,
                "rating": None,
                "done": False,
            }
            st["messages"].append(reply)
            yield ChatView(chatbot_update(st), st, "", "", **streaming_controls()).out()
            failed = False
            try:
                async with aclosing(turn.deltas()) as deltas:
                    async for _ in deltas:
                        reply["content"] = turn.text
                        if stop.is_set():
                            break  # leaving the block closes the stream: "cancelled", slot freed
                        yield ChatView(chatbot_update(st)).out()
            except Exception:  # noqa: BLE001 - logged by the service; the person gets a sentence
                failed = True
            finally:  # also when the tab went away mid-answer: what was written is kept, marked as stopped
                reply.update(content=turn.text, done=True, finish="error" if failed else turn.finish_reason)
                self.ctx.sessions.save_conversation(uid, st["conversation_id"], st["messages"])
            history = gr.update(choices=self.ctx.history(uid), value=st["conversation_id"])
            self._done(tab, stop)  # before the output that gives Send back: a send right after it is a new answer
            yield ChatView(
                chatbot_update(st),
                st,
                gr.skip(),
                status_md(SOMETHING_WRONG) if failed else "",
                history,
                **idle_controls(st),
            ).out()
        finally:
            self._done(tab, stop)

    def _done(self, tab: str, stop: asyncio.Event) -> None:
        """This answer no longer holds the tab (only its own entry: the next answer may already hold it)."""
        if self.ctx.stops.get(tab) is stop:
            del self.ctx.stops[tab]

    # ---- events --------------------------------------------------------------------------------------
    async def send(self, text: str, st: Chat, request: gr.Request):
        uid = self.ctx.user_of(request)
        try:
            text = clean_text(text, limit=self.ctx.message_limit(uid))
        except InputError as e:
            yield ChatView(status=status_md(e.message)).out()
            return
        snapshot = list(st["messages"])
        st["messages"].append({"role": "user", "content": text})
        st["pending_reason"] = st["previous"] = None
        async for out in self.answer(st, uid, request.session_hash, "new", None, snapshot, text):
            yield out

    async def stop(self, request: gr.Request) -> None:
        """Ask this tab's answer to stop; the streaming handler ends it and restores the buttons.
        (Async: it runs on the event loop that owns the ``asyncio.Event``.)"""
        event = self.ctx.stops.get(request.session_hash)
        if event is not None:
            event.set()

    async def continue_(self, st: Chat, request: gr.Request):
        """Ask the model to go on from an answer cut at the length limit."""
        uid = self.ctx.user_of(request)
        last = last_answer(st["messages"])
        if last is None or last.get("finish") != "length":
            yield ChatView(status=status_md("There is nothing to continue.")).out()
            return
        snapshot = list(st["messages"])
        st["messages"].append({"role": "user", "content": CONTINUE_PROMPT})
        st["previous"] = None
        async for out in self.answer(st, uid, request.session_hash, "new", None, snapshot, gr.skip()):
            yield out

    async def retry(self, st: Chat, data: gr.RetryData, request: gr.Request):
        uid = self.ctx.user_of(request)
        msgs = st["messages"]
        i = user_message_at(msgs, data.index)
        if i is None:
            yield ChatView(chatbot_update(st), st, status="").out()
            return
        old = msgs[i + 1] if i + 1 < len(msgs) and msgs[i + 1].get("done") else None
        snapshot = list(msgs)
        st["messages"] = msgs[: i + 1]
        st["previous"] = old if old and old.get("turn_id") else None
        st["pending_reason"] = None
        async for out in self.answer(
            st, uid, request.session_hash, "regenerate", replaced_turn(msgs, i), snapshot, gr.skip()
        ):
            yield out

    def keep(self, which: str, st: Chat, request: gr.Request) -> tuple:
        """After a regeneration: keep the previous or the new answer; the choice is a preference between them."""
        uid = self.ctx.user_of(request)
        previous, new = st.get("previous"), last_answer(st["messages"])
        st["previous"] = None
        if previous is None or new is None or not new.get("done"):
            return ChatView(chatbot_update(st), st, status="", keep=gr.update(visible=False)).out()
        kept, other = (previous, new) if which == "previous" else (new, previous)
        try:
            self.ctx.service.rate(uid, kept["turn_id"], "a", other_turn_id=other["turn_id"])
        except NotYours:
            return ChatView(status=status_md(NotYours.message), keep=gr.update(visible=False)).out()
        st["messages"][-1] = kept
        self.ctx.sessions.save_conversation(uid, st["conversation_id"], st["messages"])
        said = "Kept the previous answer." if which == "previous" else "Kept the new answer."
        return ChatView(
            chatbot_update(st), st, status=status_md(said + " Thanks, that helps.", "ok"), **idle_controls(st)
        ).out()

    def keeper(self, which: str):
        def _keep(st: Chat, request: gr.Request) -> tuple:
            return self.keep(which, st, request)

        _keep.__name__ = f"keep_{which}"
        return _keep

    async def edit(self, st: Chat, data: gr.EditData, request: gr.Request):
        uid = self.ctx.user_of(request)
        msgs = st["messages"]
        i = user_message_at(msgs, data.index)
        if i is None:
            yield ChatView(chatbot_update(st), st, status="").out()
            return
        try:
            # The edit box starts from the rendered bubble (the text HTML-escaped); ui.js unescapes it in the box,
            # so what comes back is the person's own text.
            text = clean_text(content_text(data.value), limit=self.ctx.message_limit(uid))
        except InputError as e:
            yield ChatView(chatbot_update(st), st, status=status_md(e.message)).out()
            return
        snapshot = list(msgs)
        st["messages"] = [*msgs[:i], {"role": "user", "content": text}]
        st["previous"] = st["pending_reason"] = None
        async for out in self.answer(
            st, uid, request.session_hash, "edit", replaced_turn(msgs, i), snapshot, gr.skip()
        ):
            yield out

    def undo(self, st: Chat, data: gr.UndoData, request: gr.Request) -> tuple:
        uid = self.ctx.user_of(request)
        msgs = st["messages"]
        i = user_message_at(msgs, data.index)
        if i is None or request.session_hash in self.ctx.stops:
            return ChatView(chatbot_update(st), st, status="").out()
        text = msgs[i]["content"]
        st["messages"] = msgs[:i]
        st["pending_reason"] = st["previous"] = None
        self.ctx.sessions.save_conversation(uid, st["conversation_id"], st["messages"])
        return ChatView(chatbot_update(st), st, text, "", reason=gr.update(visible=False), **idle_controls(st)).out()

    def like(self, st: Chat, data: gr.LikeData, request: gr.Request) -> tuple:
        """Thumbs up / down / cleared on one answer; a thumbs-down opens the optional reason box."""
        uid = self.ctx.user_of(request)
        i = data.index if isinstance(data.index, int) else data.index[0]
        msgs = st["messages"]
        m = msgs[i] if isinstance(i, int) and 0 <= i < len(msgs) and msgs[i]["role"] == "assistant" else None
        value = "up" if data.liked is True else "down" if data.liked is False else "cleared"
        if m is not None and not m.get("done"):
            return st, gr.skip(), gr.skip(), status_md(RATE_WHEN_DONE, "info"), chatbot_update(st)
        try:
            if m is None or not m.get("turn_id"):
                raise NotYours(NotYours.message)
            self.ctx.service.rate(uid, m["turn_id"], value)
        except NotYours:
            return st, gr.update(visible=False), gr.skip(), status_md(NotYours.message), chatbot_update(st)
        m["rating"] = None if value == "cleared" else value
        self.ctx.sessions.save_conversation(uid, st["conversation_id"], msgs)
        if value == "down":
            st["pending_reason"] = m["turn_id"]
            return (st, gr.update(visible=True), "", status_md("Thanks. What was wrong? (optional)", "info"), gr.skip())
        st["pending_reason"] = None
        return st, gr.update(visible=False), "", status_md("Thanks for the feedback.", "ok"), gr.skip()

    def send_reason(self, reason: str, st: Chat, report: str | None, request: gr.Request) -> tuple:
        """The thumbs-down's reason, and a report to the reviewers when one is picked (``ChatService.report``)."""
        uid = self.ctx.user_of(request)
        try:
            text = clean_reason(reason)
            if report and report not in REPORT_CATEGORIES:
                raise InputError("Pick a report category from the list.", "report")
        except InputError as e:
            return st, gr.skip(), gr.skip(), status_md(e.message)
        turn_id, st["pending_reason"] = st.get("pending_reason"), None
        try:
            if turn_id and text:
                self.ctx.service.rate(uid, turn_id, "down", reason=text)
            if turn_id and report:
                self.ctx.service.report(uid, turn_id, report, text)
        except NotYours:
            return st, gr.update(visible=False), "", status_md(NotYours.message)
        thanks = "Thanks: our reviewers will look at it." if report else "Thanks for the feedback."
        return st, gr.update(visible=False), "", status_md(thanks, "ok")
