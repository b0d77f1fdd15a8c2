"""The browser product: streaming chat with regenerate / edit / undo, thumbs with a reason, side-by-side
comparison, past conversations, and the consent switch.

The conversation of record is server-side (``gr.State``): raw text plus each answer's ``turn_id`` and
``model_version``. The chatbot only shows a rendering of it, in which every character a person or the
model wrote is HTML-escaped (outside code, where Markdown escapes it itself), so HTML and script in messages
show as text. The model version that wrote an answer is shown small under it.
"""

from __future__ import annotations

import asyncio
import html
import logging
import random
import re
from contextlib import aclosing
from typing import Any

import gradio as gr

from app.service import BUSY_MESSAGE, Busy, ChatService, NotYours, TurnStream
from app.sessions import LOGIN_PREFIX
from app.validation import InputError, clean_reason, clean_text, content_text
from feedback.events import Sampling, new_id

log = logging.getLogger(__name__)

CSS = """
.fw-version { opacity: 0.55; font-size: 0.75em; }
#status p { margin: 0; }
"""
_CODE = re.compile(r"(```[\s\S]*?(?:```|$)|`[^`\n]+`)")
NOT_YOURS = "You can rate only answers that were given to you."



def user_message_at(msgs: list[dict[str, Any]], index: int | tuple | list) -> int | None:
    """The index of the user message a retry / edit / undo event points at, or None if it points elsewhere."""
    i = index if isinstance(index, int) else index[0]
    return i if 0 <= i < len(msgs) and msgs[i]["role"] == "user" else None


def replaced_turn(msgs: list[dict[str, Any]], i: int) -> str | None:
    """The turn id of the answer that followed user message ``i`` (what a regeneration or edit replaces)."""
    return msgs[i + 1].get("turn_id") if i + 1 < len(msgs) else None

def escape_for_display(text: str) -> str:
    """Escape HTML outside code blocks and spans (Markdown escapes code itself), so tags show as text."""
    parts = _CODE.split(text)
    return "".join(p if i % 2 else html.escape(p, quote=False) for i, p in enumerate(parts))


def new_chat() -> dict[str, Any]:
    return {"conversation_id": new_id(), "messages": [], "pending_reason": None}


def display(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        content = escape_for_display(m["content"])
        if m["role"] == "assistant" and m.get("model_version") and m.get("done"):
            content += f'\n\n<sub class="fw-version">{html.escape(m["model_version"])}</sub>'
        out.append({"role": m["role"], "content": content})
    return out


def feedback_values(messages: list[dict[str, Any]]) -> list[str | None]:
    marks = {"up": "Like", "down": "Dislike"}
    return [marks.get(m.get("rating") or "") for m in messages if m["role"] == "assistant"]


def status_md(text: str, kind: str = "warn") -> str:
    icon = {"warn": "⚠️", "ok": "✓", "info": ""}[kind]
    return f"{icon} {html.escape(text, quote=False)}".strip()


def build_ui(service: ChatService, *, max_new_tokens: int = 256, temperature: float = 0.7) -> gr.Blocks:
    sessions = service.sessions

    def user_of(request: gr.Request | None) -> str:
        if request is None:
            return "anon-local"
        if getattr(request, "username", None):
            return LOGIN_PREFIX + request.username
        uid = sessions.user_from_cookies(request.cookies) if request.cookies is not None else None
        return uid or f"anon-{request.session_hash or new_id()}"

    def history_choices(uid: str) -> list[tuple[str, str]]:
        return sessions.list_conversations(uid)

    def sampling(seed: int | None = None, temp: float | None = None) -> Sampling:
        return Sampling(max_new_tokens=max_new_tokens, temperature=temperature if temp is None else temp, seed=seed)

    async def answer(st: dict[str, Any], uid: str, origin: str, parent: str | None, snapshot: list, restore: str):
        """Stream one answer to the last user message. Yields (chatbot, state, textbox, status, history)."""
        ctx = [{"role": m["role"], "content": m["content"]} for m in st["messages"]]
        try:
            turn: TurnStream = await service.start_turn(
                user_id=uid, conversation_id=st["conversation_id"], messages=ctx, sampling=sampling(),
                origin=origin, surface="ui", parent_turn_id=parent,
            )
        except Exception as e:  # noqa: BLE001 - input, busy, or a failing backend: a sentence, not a trace
            st["messages"] = snapshot
            msg = e.message if isinstance(e, InputError) else BUSY_MESSAGE if isinstance(e, Busy) else \
                "Something went wrong; please retry."
            yield display(st["messages"]), st, restore, status_md(msg), gr.skip()
            return
        reply = {"role": "assistant", "content": "", "turn_id": turn.turn_id,
                 "model_version": turn.model_version, "rating": None, "done": False}
        st["messages"].append(reply)
        try:
            yield display(st["messages"]), st, "", "", gr.skip()
            async with aclosing(turn.deltas()) as deltas:
                async for _ in deltas:
                    reply["content"] = turn.text
                    yield display(st["messages"]), st, gr.skip(), gr.skip(), gr.skip()
        except Exception:  # noqa: BLE001 - logged by the service; the person gets a sentence
            reply["content"] = turn.text
            reply["done"] = True
            sessions.save_conversation(uid, st["conversation_id"], st["messages"])
            yield display(st["messages"]), st, gr.skip(), status_md("Something went wrong; please retry."), gr.skip()
            return
        finally:
            await turn.aclose()  # frees the slot even when the browser left before the first token was read
            reply["content"] = turn.text
            reply["done"] = True
        sessions.save_conversation(uid, st["conversation_id"], st["messages"])
        yield (display(st["messages"]), st, gr.skip(), "",
               gr.update(choices=history_choices(uid), value=st["conversation_id"]))

    # ---- chat events ----------------------------------------------------------------------------
    async def send(text: str, st: dict[str, Any], request: gr.Request):
        uid = user_of(request)
        try:
            text = clean_text(text)
        except InputError as e:
            yield gr.skip(), st, gr.skip(), status_md(e.message), gr.skip()
            return
        snapshot = list(st["messages"])
        st["messages"].append({"role": "user", "content": text})
        st["pending_reason"] = None
        async for out in answer(st, uid, "new", None, snapshot, text):
            yield out

    async def retry(st: dict[str, Any], data: gr.RetryData, request: gr.Request):
        uid = user_of(request)
        msgs = st["messages"]
        i = user_message_at(msgs, data.index)
        if i is None:
            yield display(msgs), st, gr.skip(), "", gr.skip()
            return
        parent = replaced_turn(msgs, i)
        snapshot = list(msgs)
        st["messages"] = msgs[: i + 1]
        async for out in answer(st, uid, "regenerate", parent, snapshot, gr.skip()):
            yield out

    async def edit(st: dict[str, Any], data: gr.EditData, request: gr.Request):
        uid = user_of(request)
        msgs = st["messages"]
        i = user_message_at(msgs, data.index)
        if i is None:
            yield display(msgs), st, gr.skip(), "", gr.skip()
            return
        try:
            text = clean_text(html.unescape(content_text(data.value)))
        except InputError as e:
            yield display(msgs), st, gr.skip(), status_md(e.message), gr.skip()
            return
        parent = replaced_turn(msgs, i)
        snapshot = list(msgs)
        st["messages"] = [*msgs[:i], {"role": "user", "content": text}]
        async for out in answer(st, uid, "edit", parent, snapshot, gr.skip()):
            yield out

    def undo(st: dict[str, Any], data: gr.UndoData, request: gr.Request):
        uid = user_of(request)
        msgs = st["messages"]
        i = user_message_at(msgs, data.index)
        if i is None:
            return display(msgs), st, gr.skip(), ""
        text = msgs[i]["content"]
        st["messages"] = msgs[:i]
        st["pending_reason"] = None
        sessions.save_conversation(uid, st["conversation_id"], st["messages"])
        return display(st["messages"]), st, text, ""

    def like(st: dict[str, Any], data: gr.LikeData, request: gr.Request):
        uid = user_of(request)
        i = data.index if isinstance(data.index, int) else data.index[0]
        msgs = st["messages"]
        m = msgs[i] if 0 <= i < len(msgs) else None
        value = "up" if data.liked is True else "down" if data.liked is False else "cleared"
        try:
            fb = service.rate(uid, str((m or {}).get("turn_id") or ""), value)
        except NotYours:
            return st, gr.update(visible=False), gr.skip(), status_md(NOT_YOURS)
        m["rating"] = None if value == "cleared" else value
        sessions.save_conversation(uid, st["conversation_id"], msgs)
        if value == "down":
            st["pending_reason"] = fb.turn_id
            return st, gr.update(visible=True), "", status_md("Thanks. What was wrong? (optional)", "info")
        st["pending_reason"] = None
        return st, gr.update(visible=False), "", status_md("Thanks for the feedback.", "ok")

    def send_reason(reason: str, st: dict[str, Any], request: gr.Request):
        uid = user_of(request)
        try:
            text = clean_reason(reason)
        except InputError as e:
            return st, gr.skip(), gr.skip(), status_md(e.message)
        turn_id, st["pending_reason"] = st.get("pending_reason"), None
        if turn_id and text:
            try:
                service.rate(uid, turn_id, "down", reason=text)
            except NotYours:
                return st, gr.update(visible=False), "", status_md(NOT_YOURS)
        return st, gr.update(visible=False), "", status_md("Thanks for the feedback.", "ok")

    # ---- conversations and consent --------------------------------------------------------------
    def on_load(request: gr.Request):
        uid = user_of(request)
        st = new_chat()
        who = request.username if getattr(request, "username", None) else "this browser"
        return (st, [], gr.update(choices=history_choices(uid), value=None), sessions.consent(uid),
                f"Signed in as {html.escape(who)}" if who != "this browser" else "Your chats are kept in this browser.")

    def start_new(request: gr.Request):
        uid = user_of(request)
        return new_chat(), [], gr.update(choices=history_choices(uid), value=None), "", gr.update(visible=False)

    def open_conversation(conversation_id: str | None, request: gr.Request):
        uid = user_of(request)
        msgs = sessions.load_conversation(uid, conversation_id) if conversation_id else None
        if msgs is None:
            return gr.skip(), gr.skip(), status_md("That conversation is not available.")
        st = {"conversation_id": conversation_id, "messages": msgs, "pending_reason": None}
        return st, gr.update(value=display(msgs), feedback_value=feedback_values(msgs)), ""

    def set_consent(value: bool, request: gr.Request):
        uid = user_of(request)
        service.set_consent(uid, bool(value))
        return status_md(
            "Thank you: your conversations may be used to improve the model." if value
            else "Your conversations will not be used to improve the model.", "ok")

    # ---- side by side ---------------------------------------------------------------------------
    async def compare(prompt: str, request: gr.Request):
        uid = user_of(request)
        no_vote = gr.update(interactive=False)
        try:
            text = clean_text(prompt)
        except InputError as e:
            yield gr.skip(), gr.skip(), gr.skip(), no_vote, no_vote, no_vote, status_md(e.message)
            return
        va, vb = service.compare_versions(uid)
        if random.random() < 0.5:
            va, vb = vb, va
        conversation_id = new_id()
        seeds = random.sample(range(1, 2**31), 2)
        starts = await asyncio.gather(
            *(service.start_turn(user_id=uid, conversation_id=conversation_id,
                                 messages=[{"role": "user", "content": text}],
                                 sampling=sampling(seed, max(temperature, 0.7)), origin="compare", surface="ui",
                                 model_version=v) for v, seed in ((va, seeds[0]), (vb, seeds[1]))),
            return_exceptions=True,
        )
        turns = [t for t in starts if isinstance(t, TurnStream)]
        if len(turns) < 2:
            for t in turns:  # release the slot we did get
                await t.aclose()
            err = next(e for e in starts if not isinstance(e, TurnStream))
            msg = err.message if isinstance(err, InputError) else BUSY_MESSAGE if isinstance(err, Busy) else \
                "Something went wrong; please retry."
            yield {}, "", "", no_vote, no_vote, no_vote, status_md(msg)
            return
        ta, tb = turns
        pair = {"a": {"turn_id": ta.turn_id, "model_version": ta.model_version},
                "b": {"turn_id": tb.turn_id, "model_version": tb.model_version}, "voted": False}
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(t: TurnStream) -> None:
            try:
                async with aclosing(t.deltas()) as deltas:
                    async for _ in deltas:
                        await queue.put(t)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(ta)), asyncio.create_task(pump(tb))]
        yield pair, "", "", no_vote, no_vote, no_vote, ""
        try:
            finished = 0
            while finished < 2:
                item = await queue.get()
                if item is None:
                    finished += 1
                    continue
                yield gr.skip(), ta.text, tb.text, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        finally:
            for task in tasks:
                task.cancel()
        vote = gr.update(interactive=True)
        yield (pair, ta.text, tb.text, vote, vote, vote,
               status_md("Which answer is better?", "info"))

    def vote(choice: str, pair: dict[str, Any], request: gr.Request):
        uid = user_of(request)
        if not pair:
            return gr.skip(), gr.skip(), gr.skip(), status_md("Start a comparison first.")
        if pair.get("voted"):
            return gr.skip(), gr.skip(), gr.skip(), status_md("You already voted on this pair.")
        try:
            fb = service.rate(uid, pair["a"]["turn_id"], choice, other_turn_id=pair["b"]["turn_id"])
        except NotYours:
            return gr.skip(), gr.skip(), gr.skip(), status_md(NOT_YOURS)
        pair["voted"] = True
        return (pair, gr.update(label=f"Answer A · {fb.model_version}"),
                gr.update(label=f"Answer B · {fb.other_model_version}"),
                status_md("Thanks! Vote recorded.", "ok"))

    def voter(choice: str):
        def _vote(p: dict[str, Any], request: gr.Request):
            return vote(choice, p, request)

        return _vote

    # ---- layout ---------------------------------------------------------------------------------
    with gr.Blocks(title="Flywheel", analytics_enabled=False) as demo:
        state = gr.State(new_chat())
        pair = gr.State({})
        with gr.Sidebar(open=True):
            gr.Markdown("### Flywheel")
            new_btn = gr.Button("New chat", elem_id="new-chat", size="sm")
            history = gr.Radio(label="Your conversations", choices=[], elem_id="history")
            consent = gr.Checkbox(label="Use my conversations to improve the model", elem_id="consent")
            who = gr.Markdown(elem_id="who")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chatbot = gr.Chatbot(
                    elem_id="chatbot", editable="user", feedback_options=("Like", "Dislike"), height=520,
                    sanitize_html=True, allow_tags=False, buttons=["copy"], show_label=False,
                    placeholder="Ask anything. Rate answers with 👍 / 👎 to help improve the model.",
                )
                status = gr.Markdown(elem_id="status")
                with gr.Row(visible=False, elem_id="reason-row") as reason_row:
                    reason = gr.Textbox(label="What was wrong with this answer? (optional)", elem_id="reason",
                                        scale=5, max_length=1000)
                    reason_btn = gr.Button("Send reason", elem_id="reason-send", scale=1)
                with gr.Row():
                    msg = gr.Textbox(placeholder="Message Flywheel…", show_label=False, elem_id="msg", scale=6,
                                     lines=1, max_lines=8, autofocus=True)
                    send_btn = gr.Button("Send", elem_id="send", variant="primary", scale=1)
            with gr.Tab("Compare", id="compare"):
                gr.Markdown("Two answers to the same prompt. Which one is better?")
                cmp_prompt = gr.Textbox(label="Prompt", elem_id="cmp-prompt", lines=2)
                cmp_btn = gr.Button("Compare", elem_id="cmp-go", variant="primary")
                with gr.Row():
                    ans_a = gr.Textbox(label="Answer A", elem_id="cmp-a", lines=8, interactive=False)
                    ans_b = gr.Textbox(label="Answer B", elem_id="cmp-b", lines=8, interactive=False)
                with gr.Row():
                    vote_a = gr.Button("A is better", elem_id="vote-a", interactive=False)
                    vote_tie = gr.Button("Tie", elem_id="vote-tie", interactive=False)
                    vote_b = gr.Button("B is better", elem_id="vote-b", interactive=False)
                cmp_status = gr.Markdown(elem_id="cmp-status")

        chat_out = [chatbot, state, msg, status, history]
        gen = dict(concurrency_limit=None, show_progress="hidden")
        msg.submit(send, [msg, state], chat_out, **gen)
        send_btn.click(send, [msg, state], chat_out, **gen)
        chatbot.retry(retry, [state], chat_out, **gen)
        chatbot.edit(edit, [state], chat_out, **gen)
        chatbot.undo(undo, [state], [chatbot, state, msg, status])
        chatbot.like(like, [state], [state, reason_row, reason, status])
        reason_btn.click(send_reason, [reason, state], [state, reason_row, reason, status])
        reason.submit(send_reason, [reason, state], [state, reason_row, reason, status])
        new_btn.click(start_new, None, [state, chatbot, history, status, reason_row])
        chatbot.clear(start_new, None, [state, chatbot, history, status, reason_row])
        history.input(open_conversation, [history], [state, chatbot, status])
        consent.input(set_consent, [consent], [status])
        cmp_out = [pair, ans_a, ans_b, vote_a, vote_tie, vote_b, cmp_status]
        cmp_btn.click(compare, [cmp_prompt], cmp_out, **gen)
        for btn, choice in ((vote_a, "a"), (vote_tie, "tie"), (vote_b, "b")):
            btn.click(voter(choice), [pair], [pair, ans_a, ans_b, cmp_status])
        demo.load(on_load, None, [state, chatbot, history, consent, who])
    demo.queue(default_concurrency_limit=32)
    return demo
