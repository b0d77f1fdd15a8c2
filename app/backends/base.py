"""The one interface every generation backend implements.

A backend turns a conversation into a stream of text deltas. The app never cares whether tokens come from
the in-process model or a remote TGI / vLLM / OpenAI-compatible endpoint.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from feedback.events import FinishReason, Sampling

MODEL_SERVER_TOKEN_ENV = "FLYWHEEL_MODEL_SERVER_TOKEN"  # the bearer token a model server off loopback requires


class Busy(RuntimeError):
    """The backend is at its concurrency bound; the API answers 429 and the UI a busy message."""


@dataclass(frozen=True)
class Chunk:
    """One streamed piece. The last chunk of a stream has ``finish_reason`` set and the token counts."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # of prompt_tokens, how many came from a cached prefix (engines that cache)


class Backend(Protocol):
    name: str  # e.g. "embedded:/path" or "remote:http://host:port"

    def stream(
        self,
        messages: list[dict[str, str]],
        sampling: Sampling,
        cache_scope: str | None = None,
        party: str | None = None,
    ) -> AsyncIterator[Chunk]:
        """Yield text deltas for the answer to ``messages`` (OpenAI-style role/content dicts).

        ``cache_scope`` (the app passes the user) bounds prefix reuse in engines that cache prompts: a request
        reuses only prefixes computed for its own scope. Backends without a prompt cache ignore it.

        ``party`` (the app passes the API key or the browser user) is whom the answer counts against for fair
        scheduling (``app.vtc``). Backends that schedule themselves expose their ``counters``; others ignore it.

        Raises ``Busy`` (before yielding anything) when over the concurrency bound.
        Cancelling the consumer (closing the async generator) frees the slot promptly.
        """
        ...

    def load(self) -> float:
        """Fraction of the concurrency bound in use, 0.0 .. 1.0 (for /metrics and routing)."""
        ...

    async def aclose(self) -> None: ...
