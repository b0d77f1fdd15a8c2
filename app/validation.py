"""Input limits for everything a person or a client sends: one place, polite messages, no stack traces.

The UI shows ``InputError.message`` as it is; the API wraps it in an OpenAI-style 400 error body. Length limits
are not fixed numbers: ``Limits.for_context`` derives them from the context window (tokens) of the version that
will answer, with the ratios in the settings (``app_chars_per_token``, ``app_message_share``), so a bigger model
takes longer messages. Character limits are the cheap check at the door; the backend still counts tokens and drops
the oldest history that does not fit. Sampling values and the API ``user`` field are checked here too, so nothing
out of range ever reaches a backend (an unchecked seed once crashed a stream after it had taken a slot).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from feedback.events import Sampling
from feedback.settings import Settings

MAX_REASON_CHARS = 1_000
MAX_USER_CHARS = 64
MAX_SEED = 2**63 - 1
MIN_TEMPERATURE = 0.01  # below this, sampling divides logits into infinities: treated as greedy (0)
MAX_TEMPERATURE = 2.0  # the OpenAI API's range
ALLOWED_CONTROL = {"\n", "\r", "\t"}
ROLES = ("system", "user", "assistant")
_USER_OK = re.compile(r"[^\s\x00-\x1f\x7f]+")


class InputError(ValueError):
    """A rejected input; ``message`` is written for the person who sent it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class Limits:
    """What one answering version accepts. Build with ``for_context``; ``DEFAULT_LIMITS`` is a 2k-token window."""

    context_tokens: int
    message_chars: int  # one user or system message
    answer_chars: int  # an assistant message a client sends back as context
    conversation_chars: int  # all messages together (the backend trims the oldest to the window)
    conversation_messages: int
    max_new_tokens: int

    @classmethod
    def for_context(
        cls,
        context_tokens: int,
        *,
        chars_per_token: float = 4.0,
        message_share: float = 0.5,
        max_messages: int = 40,
        max_new_tokens: int = 2048,
    ) -> Limits:
        window_chars = int(context_tokens * chars_per_token)
        return cls(
            context_tokens=context_tokens,
            message_chars=max(1, int(window_chars * message_share)),
            answer_chars=window_chars,
            conversation_chars=2 * window_chars,
            conversation_messages=max_messages,
            max_new_tokens=max(1, min(max_new_tokens, context_tokens - 1)),
        )

    @classmethod
    def from_settings(cls, context_tokens: int, settings: Settings, *, max_new_tokens: int | None = None) -> Limits:
        return cls.for_context(
            context_tokens,
            chars_per_token=settings.app_chars_per_token,
            message_share=settings.app_message_share,
            max_messages=settings.app_max_messages,
            max_new_tokens=settings.api_max_new_tokens if max_new_tokens is None else max_new_tokens,
        )


DEFAULT_LIMITS = Limits.for_context(2048)
MAX_MESSAGE_CHARS = DEFAULT_LIMITS.message_chars  # what the UI checks before it knows the answering version


def _control_chars(text: str) -> list[str]:
    return [c for c in text if c not in ALLOWED_CONTROL and unicodedata.category(c) in ("Cc", "Cs")]


def clean_text(text: Any, *, what: str = "message", limit: int = MAX_MESSAGE_CHARS, param: str | None = None) -> str:
    """Normalised, stripped text, or ``InputError`` for empty, oversized or control-character input."""
    if not isinstance(text, str):
        raise InputError(f"The {what} must be text.", param)
    if len(text) > 4 * limit + 1024:  # refuse before normalising megabytes
        raise InputError(
            f"The {what} is {len(text):,} characters long; the limit is {limit:,}. Please shorten it.", param
        )
    bad = _control_chars(text)
    if bad:
        shown = ", ".join(sorted({f"U+{ord(c):04X}" for c in bad})[:3])
        raise InputError(
            f"The {what} contains control characters ({shown}) that cannot be sent. Please remove them.", param
        )
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").strip()
    if not text:
        raise InputError(f"The {what} is empty. Please type something first.", param)
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


def clean_user(raw: Any) -> str | None:
    """The API's end-user name (OpenAI ``user``): None when absent, else 1-64 visible characters, no spaces."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if not isinstance(raw, str):
        raise InputError("The user field must be text.", "user")
    user = unicodedata.normalize("NFC", raw.strip())
    if len(user) > MAX_USER_CHARS or not _USER_OK.fullmatch(user) or _control_chars(user) or not user.isprintable():
        raise InputError(
            f"The user field must be 1-{MAX_USER_CHARS} visible characters without spaces or control characters.",
            "user",
        )
    return user


def check_sampling(
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Sampling:
    """Sampling values from a client, each range-checked with a sentence naming it; tiny temperatures are greedy."""
    kw: dict[str, Any] = {}
    if temperature is not None:
        if not math.isfinite(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
            raise InputError(f"temperature must be between 0 and {MAX_TEMPERATURE:g}.", "temperature")
        kw["temperature"] = 0.0 if temperature < MIN_TEMPERATURE else temperature
    if top_p is not None:
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise InputError("top_p must be greater than 0 and at most 1.", "top_p")
        kw["top_p"] = top_p
    if max_tokens is not None:
        if not 1 <= max_tokens <= limits.max_new_tokens:
            raise InputError(f"max_tokens must be between 1 and {limits.max_new_tokens}.", "max_tokens")
        kw["max_new_tokens"] = max_tokens
    if seed is not None:
        if not 0 <= seed <= MAX_SEED:
            raise InputError(f"seed must be between 0 and {MAX_SEED}.", "seed")
        kw["seed"] = seed
    return Sampling(**kw)


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


def check_conversation(messages: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> list[dict[str, str]]:
    """A whole conversation as sent to the model: roles, per-message limits, length, last message the user's."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InputError("The conversation is empty: send at least one user message.", "messages")
    if len(messages) > limits.conversation_messages:
        raise InputError(
            f"This conversation is too long ({len(messages)} messages; the limit is {limits.conversation_messages}). "
            "Please start a new chat.",
            "messages",
        )
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        if not isinstance(role, str) or role not in ROLES:
            shown = role if isinstance(role, str) and len(role) <= 20 else type(role).__name__
            raise InputError(f"Message {i} has role {shown!r}; use system, user or assistant.", "messages")
        limit = limits.answer_chars if role == "assistant" else limits.message_chars
        text = clean_text(content_text(content), what=f"{role} message", limit=limit, param="messages")
        out.append({"role": role, "content": text})
    if out[-1]["role"] != "user":
        raise InputError("The last message must be the user's.", "messages")
    total = sum(len(m["content"]) for m in out)
    if total > limits.conversation_chars:
        raise InputError(
            f"This conversation is too long ({total:,} characters; the limit is {limits.conversation_chars:,}). "
            "Please start a new chat.",
            "messages",
        )
    return out
