"""Input limits for everything a person or a client sends: one place, polite messages, no stack traces.

The UI shows ``InputError.message`` as it is; the API wraps it in an OpenAI-style 400 error body. Limits
keep a conversation well inside the default model's context window (8k tokens) and far below the event
contract's 64k-character cap, so a valid input always yields a valid ``ChatTurn``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

MAX_MESSAGE_CHARS = 4_000  # one user (or system) message
MAX_ANSWER_CHARS = 32_000  # an assistant message a client sends back as context
MAX_CONVERSATION_MESSAGES = 40
MAX_CONVERSATION_CHARS = 16_000  # ~4k tokens of context, leaving room for the answer
MAX_REASON_CHARS = 1_000
MAX_NEW_TOKENS = 2_048  # per answer, API and UI
MAX_BODY_BYTES = 1_000_000  # raw HTTP body of an API request
ALLOWED_CONTROL = {"\n", "\r", "\t"}
ROLES = ("system", "user", "assistant")


class InputError(ValueError):
    """A rejected input; ``message`` is written for the person who sent it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


def _control_chars(text: str) -> list[str]:
    return [c for c in text if c not in ALLOWED_CONTROL and unicodedata.category(c) in ("Cc", "Cs")]


def clean_text(text: Any, *, what: str = "message", limit: int = MAX_MESSAGE_CHARS, param: str | None = None) -> str:
    """Normalised, stripped text, or ``InputError`` for empty, oversized or control-character input."""
    if not isinstance(text, str):
        raise InputError(f"The {what} must be text.", param)
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").strip()
    if not text:
        raise InputError(f"The {what} is empty. Please type something first.", param)
    bad = _control_chars(text)
    if bad:
        shown = ", ".join(sorted({f"U+{ord(c):04X}" for c in bad})[:3])
        raise InputError(
            f"The {what} contains control characters ({shown}) that cannot be sent. Please remove them.", param
        )
    if len(text) > limit:
        raise InputError(
            f"The {what} is {len(text):,} characters long; the limit is {limit:,}. Please shorten it.", param
        )
    return text


def clean_reason(text: Any) -> str | None:
    """The optional reason after a thumbs down: empty means no reason."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    return clean_text(text, what="reason", limit=MAX_REASON_CHARS, param="reason")


def content_text(content: Any) -> str:
    """OpenAI / Gradio message content (a string or a list of blocks) -> plain text; other media is refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, bytes | bytearray):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
                parts.append(block["text"])
            else:
                raise InputError("Only text messages are supported.", "messages")
        return "".join(parts)
    if content is None:
        return ""
    raise InputError("Message content must be text.", "messages")


def check_conversation(messages: Sequence[Any]) -> list[dict[str, str]]:
    """A whole conversation as sent to the model: roles, per-message limits, length, last message the user's."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InputError("The conversation is empty: send at least one user message.", "messages")
    if len(messages) > MAX_CONVERSATION_MESSAGES:
        raise InputError(
            f"This conversation is too long ({len(messages)} messages; the limit is {MAX_CONVERSATION_MESSAGES}). "
            "Please start a new chat.",
            "messages",
        )
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        if role not in ROLES:
            raise InputError(f"Message {i} has role {role!r}; use system, user or assistant.", "messages")
        limit = MAX_ANSWER_CHARS if role == "assistant" else MAX_MESSAGE_CHARS
        text = clean_text(content_text(content), what=f"{role} message", limit=limit, param="messages")
        out.append({"role": role, "content": text})
    if out[-1]["role"] != "user":
        raise InputError("The last message must be the user's.", "messages")
    total = sum(len(m["content"]) for m in out)
    if total > MAX_CONVERSATION_CHARS:
        raise InputError(
            f"This conversation is too long ({total:,} characters; the limit is {MAX_CONVERSATION_CHARS:,}). "
            "Please start a new chat.",
            "messages",
        )
    return out
