"""Compare as an arena: two versions of the current release plan answer the current conversation side by side.

The answers are labelled A and B in random order and the versions stay on the server (``gr.State`` never
reaches the browser) until the person votes; the vote is recorded once (a pairwise ``Feedback``), shown, and
the versions revealed. The preferred answer (A on a tie) then joins the conversation, so the chat goes on
from what the person chose.
"""

from __future__ import annotations

import asyncio
import random
from contextlib import aclosing
from typing import Any

import gradio as gr

from app.service import NotYours, TurnStream
from app.ui.chat import chatbot_update
from app.ui.context import UIContext, error_sentence
from app.ui.render import markdown_html, md_text, status_md
from app.ui.state import Chat, Message, context
from app.validation import InputError, clean_text

CHOICE_TEXT = {"a": "A is better", "b": "B is better", "tie": "a tie"}
WAITING = '<p class="fw-muted">…</p>'


def pane(text: str) -> str:
    return f'<div class="fw-md">{markdown_html(text) if text else WAITING}</div>'


def label(side: str, version: str | None = None, picked: bool = False) -> str:
    shown = f"Model {side.upper()}" + (f" · {md_text(version)}" if version else "")
    return f"**{shown}**" + (" ✓ your pick" if picked else "")


def context_note(st: Chat) -> str:
    n = len(st["messages"])
    return (
        f"Both answer your current chat ({n} earlier message{'s' * (n != 1)}) plus the message below."
        if n
        else "Your current chat is empty: both answer just the message below."
    )


class ArenaHandlers:
    def __init__(self, ctx: UIContext):
        self.ctx = ctx

    async def compare(self, prompt: str, st: Chat, request: gr.Request):
        """Yields (pair, pane A, pane B, vote A, tie, vote B, status, label A, label B)."""
        uid = self.ctx.user_of(request)
        off = gr.update(interactive=False)
        try:
            text = clean_text(prompt, limit=self.ctx.message_limit(uid))
        except InputError as e:
            yield gr.skip(), gr.skip(), gr.skip(), off, off, off, status_md(e.message), gr.skip(), gr.skip()
            return
        va, vb = self.ctx.service.compare_versions(uid)
        if random.random() < 0.5:
            va, vb = vb, va
        messages = [*context(st["messages"]), {"role": "user", "content": text}]
        turns = await self._start_both(uid, st["conversation_id"], messages, (va, vb))
        if isinstance(turns, str):
            yield {}, pane(""), pane(""), off, off, off, status_md(turns), label("a"), label("b")
            return
        ta, tb = turns
        pair = {
            "prompt": text,
            "voted": None,
            "conversation_id": st["conversation_id"],
            "a": {"turn_id": ta.turn_id, "model_version": ta.model_version},
            "b": {"turn_id": tb.turn_id, "model_version": tb.model_version},
        }
        same = va == vb
        note = "Only one version is live now, so both answers come from it." if same else ""
        yield pair, pane(""), pane(""), off, off, off, status_md(note, "info"), label("a"), label("b")
        async for _ in self._stream_both(ta, tb):
            yield (
                gr.skip(),
                pane(ta.text),
                pane(tb.text),
                gr.skip(),
                gr.skip(),
                gr.skip(),
                gr.skip(),
                gr.skip(),
                gr.skip(),
            )
        for side, t in (("a", ta), ("b", tb)):
            pair[side].update(text=t.text, finish=t.finish_reason)
        on = gr.update(interactive=True)
        yield (
            pair,
            pane(ta.text),
            pane(tb.text),
            on,
            on,
            on,
            status_md("Which answer is better?", "info"),
            gr.skip(),
            gr.skip(),
        )

    async def _start_both(
        self, uid: str, conversation_id: str, messages: list[dict[str, str]], versions: tuple[str, str]
    ) -> tuple[TurnStream, TurnStream] | str:
        seeds = random.sample(range(1, 2**31), 2)
        starts = await asyncio.gather(
            *(
                self.ctx.service.start_turn(
                    user_id=uid,
                    conversation_id=conversation_id,
                    messages=messages,
                    sampling=self.ctx.sampling(seed, max(self.ctx.temperature, 0.7)),
                    origin="compare",
                    surface="ui",
                    model_version=v,
                )
                for v, seed in zip(versions, seeds, strict=True)
            ),
            return_exceptions=True,
        )
        turns = [t for t in starts if isinstance(t, TurnStream)]
        if len(turns) == 2:
            return turns[0], turns[1]
        for t in turns:  # release the slot we did get
            await t.aclose()
        return error_sentence(next(e for e in starts if not isinstance(e, TurnStream)))

    @staticmethod
    async def _stream_both(ta: TurnStream, tb: TurnStream):
        """Yield whenever either answer grew, until both are done."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(t: TurnStream) -> None:
            try:
                async with aclosing(t.deltas()) as deltas:
                    async for _ in deltas:
                        await queue.put(t)
            except Exception:  # noqa: BLE001 - logged by the service; the pane keeps what came
                pass
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(ta)), asyncio.create_task(pump(tb))]
        try:
            finished = 0
            while finished < 2:
                if await queue.get() is None:
                    finished += 1
                else:
                    yield
        finally:
            for task in tasks:
                task.cancel()

    def vote(self, choice: str, pair: dict[str, Any], st: Chat, request: gr.Request) -> tuple:
        """Outputs: (pair, label A, label B, vote A, tie, vote B, status, chat state, chatbot)."""
        uid = self.ctx.user_of(request)
        off = gr.update(interactive=False)
        skip5 = (gr.skip(),) * 5
        if not pair or "text" not in pair.get("a", {}):
            return (gr.skip(), gr.skip(), gr.skip(), *skip5[:3], status_md("Start a comparison first."), *skip5[:2])
        if pair.get("voted"):
            return (
                gr.skip(),
                gr.skip(),
                gr.skip(),
                off,
                off,
                off,
                status_md(f"You already voted on this pair ({CHOICE_TEXT[pair['voted']]})."),
                *skip5[:2],
            )
        a, b = pair["a"], pair["b"]
        try:
            self.ctx.service.rate(uid, a["turn_id"], choice, other_turn_id=b["turn_id"])
        except NotYours:
            return (gr.skip(), gr.skip(), gr.skip(), off, off, off, status_md(NotYours.message), *skip5[:2])
        pair["voted"] = choice
        kept = b if choice == "b" else a
        if st["conversation_id"] == pair["conversation_id"]:
            self._join_conversation(uid, st, pair["prompt"], kept)
        said = (
            f"Vote recorded: {CHOICE_TEXT[choice]}. A was {a['model_version']}, B was {b['model_version']}. "
            "The preferred answer continues your chat."
        )
        return (
            pair,
            label("a", a["model_version"], choice == "a"),
            label("b", b["model_version"], choice == "b"),
            off,
            off,
            off,
            status_md(said, "ok"),
            st,
            chatbot_update(st),
        )

    def _join_conversation(self, uid: str, st: Chat, prompt: str, kept: dict[str, Any]) -> None:
        answer: Message = {
            "role": "assistant",
            "content": kept["text"],
            "turn_id": kept["turn_id"],
            "model_version": kept["model_version"],
            "rating": None,
            "done": True,
            "finish": kept.get("finish", "stop"),
        }
        st["messages"] = [*st["messages"], {"role": "user", "content": prompt}, answer]
        st["previous"] = st["pending_reason"] = None
        self.ctx.sessions.save_conversation(uid, st["conversation_id"], st["messages"])

    def voter(self, choice: str):
        def _vote(pair: dict[str, Any], st: Chat, request: gr.Request) -> tuple:
            return self.vote(choice, pair, st, request)

        _vote.__name__ = f"vote_{choice}"
        return _vote
