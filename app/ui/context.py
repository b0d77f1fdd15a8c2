"""What every UI handler needs: the chat service, who is asking, the answer settings, and the open streams.

Handlers are methods of small classes built around one ``UIContext``, so a reader finds each one by name
(``ChatHandlers.retry``) and a test can call it without a browser.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import gradio as gr

from app.service import BUSY_MESSAGE, Busy, ChatService, NotYours
from app.sessions import LOGIN_PREFIX
from app.validation import InputError
from feedback.events import Sampling, new_id

SOMETHING_WRONG = "Something went wrong; please retry."


@dataclass
class UIContext:
    service: ChatService
    max_new_tokens: int = 256
    temperature: float = 0.7
    stops: dict[str, asyncio.Event] = field(default_factory=dict)  # tab (session hash) -> its stop request

    @property
    def sessions(self):
        return self.service.sessions

    def user_of(self, request: gr.Request | None) -> str:
        """The signed-cookie user (or the Gradio login); a tab without a cookie gets a throwaway id."""
        if request is None:
            return "anon-local"
        if getattr(request, "username", None):
            return LOGIN_PREFIX + request.username
        uid = self.sessions.user_from_cookies(request.cookies) if request.cookies is not None else None
        return uid or f"anon-{request.session_hash or new_id()}"

    def sampling(self, seed: int | None = None, temperature: float | None = None) -> Sampling:
        return Sampling(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature if temperature is None else temperature,
            seed=seed,
        )

    def message_limit(self, user_id: str) -> int:
        """Characters one message may have: derived from the context window of the version that will answer."""
        return self.service.limits(self.service.version_for(user_id)).message_chars

    def history(self, user_id: str) -> list[tuple[str, str]]:
        return self.sessions.list_conversations(user_id)


def error_sentence(err: BaseException) -> str:
    """What a person is told when an answer could not start."""
    if isinstance(err, InputError):
        return err.message
    if isinstance(err, Busy):
        return BUSY_MESSAGE
    if isinstance(err, NotYours):
        return NotYours.message
    return SOMETHING_WRONG
