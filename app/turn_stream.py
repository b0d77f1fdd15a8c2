"""A started answer (``TurnStream``): its text deltas, its generation slot, and the one ``ChatTurn`` it leaves.

Its own idea because it is the one object a caller holds between starting an answer and its end, and the place
that makes sure a slot is never kept: ``aclose`` (or ``async with``) frees a turn whose deltas were never read,
and a turn nobody starts reading within ``app_turn_claim_s`` is closed by a timer (``_expire``), so even a caller
that drops a turn on the floor cannot leak the slot. When iteration ends -- finished, cut at the length limit,
or cancelled by a client that went away -- it hands itself back to ``ChatService.finish_turn``, which records
who was served the turn and emits exactly one ``ChatTurn``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.backends.base import Backend, Chunk
from feedback.events import FinishReason, Origin, Sampling, new_id

if TYPE_CHECKING:
    from app.service import ChatService

log = logging.getLogger(__name__)


@dataclass
class TurnStream:
    """A started answer. Iterate it for text deltas; the fields are final once iteration ends."""

    service: ChatService
    backend: Backend
    agen: AsyncIterator[Chunk]
    first: Chunk | None
    user_id: str
    conversation_id: str
    model_version: str
    messages: list[dict[str, str]]
    sampling: Sampling
    origin: Origin
    surface: str
    consent: bool
    parent_turn_id: str | None
    t0: float
    turn_id: str = field(default_factory=new_id)
    text: str = ""
    finish_reason: FinishReason = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens served from a cached prefix, where the engine says
    ttft_ms: float | None = None
    latency_ms: float | None = None
    done: bool = False
    unrecorded: bool = False  # its ChatTurn could not be recorded (outbox full): the API says so
    claimed: bool = False
    claim_timer: asyncio.TimerHandle | None = None
    on_complete: list[Callable[[], None]] = field(default_factory=list)  # run once, when the slot is free

    async def __aenter__(self) -> TurnStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Free the slot and record the turn now (as ``cancelled`` if it never finished). Idempotent."""
        self._claim()
        if self.done:
            return
        try:
            await self.agen.aclose()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - closing is best effort; the turn is recorded either way
            log.exception("closing the backend stream of turn %s failed", self.turn_id)
        finally:
            if self.finish_reason == "stop" and not self.text:
                self.finish_reason = "cancelled"
            self.service.finish_turn(self)

    def _claim(self) -> None:
        self.claimed = True
        if self.claim_timer is not None:
            self.claim_timer.cancel()
            self.claim_timer = None

    def _expire(self) -> None:
        """Timer callback: nobody read this turn in time, so close it (the reader went away before starting)."""
        if not self.claimed and not self.done:
            log.warning("turn %s was never read; closing it to free its slot", self.turn_id)
            asyncio.ensure_future(self.aclose())

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas. Consume with ``contextlib.aclosing`` so a client that leaves ends the turn at once."""
        self._claim()
        finish = "cancelled"
        if self.done:
            return
        try:
            chunk = self.first
            self.first = None
            while chunk is not None:
                if chunk.text:
                    if self.ttft_ms is None:
                        self.ttft_ms = (time.perf_counter() - self.t0) * 1000
                    self.text += chunk.text
                    yield chunk.text
                if chunk.prompt_tokens is not None:
                    self.prompt_tokens = chunk.prompt_tokens
                if chunk.completion_tokens is not None:
                    self.completion_tokens = chunk.completion_tokens
                if chunk.cached_tokens is not None:
                    self.cached_tokens = chunk.cached_tokens
                if chunk.finish_reason is not None:
                    finish = chunk.finish_reason
                    break
                try:
                    chunk = await self.agen.__anext__()
                except StopAsyncIteration:
                    finish = "stop"
                    break
        except Exception:
            finish = "error"
            log.exception("generation failed for turn %s (%s)", self.turn_id, self.model_version)
            raise
        finally:
            self.finish_reason = finish  # type: ignore[assignment]
            try:
                await self.agen.aclose()  # type: ignore[attr-defined]  # frees the backend slot at once
            except Exception:  # noqa: BLE001 - freeing the slot is best effort
                log.exception("closing the backend stream of turn %s failed", self.turn_id)
            self.service.finish_turn(self)
