"""The conversation of record, kept on the server per browser tab (``gr.State``) and in the sessions store.

A chat is a dict (Gradio deep-copies State values, so it stays plain data): ``conversation_id``, the
``messages`` and two pending choices -- the thumbs-down waiting for a reason, and after a regeneration the
previous answer, offered back until the person picks which one to keep. A message is the raw text plus, for
an answer, who wrote it and how it ended, so the chatbot can always be redrawn from it.
"""

from __future__ import annotations

from typing import Any, TypedDict

from feedback.events import new_id


class Message(TypedDict, total=False):
    role: str  # "user" | "assistant"
    content: str  # raw text, never markup
    turn_id: str
    model_version: str
    rating: str | None  # "up" | "down" | None
    done: bool
    finish: str  # the turn's finish reason: "stop" | "length" | "cancelled" | "error"


Chat = dict[str, Any]


def new_chat() -> Chat:
    return {"conversation_id": new_id(), "messages": [], "pending_reason": None, "previous": None}


def chat_of(conversation_id: str, messages: list[Message]) -> Chat:
    return {"conversation_id": conversation_id, "messages": messages, "pending_reason": None, "previous": None}


def context(messages: list[Message]) -> list[dict[str, str]]:
    """What the model sees: role and text only."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def user_message_at(msgs: list[Message], index: int | tuple | list) -> int | None:
    """The index of the user message a retry / edit / undo event points at, or None if it points elsewhere."""
    i = index if isinstance(index, int) else index[0]
    return i if isinstance(i, int) and 0 <= i < len(msgs) and msgs[i]["role"] == "user" else None


def replaced_turn(msgs: list[Message], i: int) -> str | None:
    """The turn id of the answer that followed user message ``i`` (what a regeneration or edit replaces)."""
    return msgs[i + 1].get("turn_id") if i + 1 < len(msgs) else None


def last_answer(msgs: list[Message]) -> Message | None:
    return msgs[-1] if msgs and msgs[-1]["role"] == "assistant" else None
