"""One answer, start to finish, for the UI and the API alike: route, stream, then record and emit.

``ChatService.start_turn`` picks the user's release, starts the backend's stream and waits for the first
chunk, so ``Busy`` and input errors surface before a response has begun (a 429 or a polite message, never a
half-open stream). Iterating the returned ``TurnStream`` (``app/turn_stream.py``) yields text deltas; when it
ends -- finished, cut at the length limit, or cancelled by a client that went away -- ``finish_turn`` records
who was served the turn and emits exactly one ``ChatTurn`` through the process's producer.

A started answer holds a generation slot in its backend, and no path may keep it: ``start_turn`` closes the
backend stream on any failure before it returns, and the ``TurnStream`` frees its slot however its caller leaves
it. Ratings, reports and consent changes are ``FeedbackDesk`` (``app/feedback_desk.py``), which this service
inherits: ``rate`` is the one way in for a rating, and it checks that the turns were served to the rater.

Which versions are loaded, and when one is loaded or unloaded without a restart, is ``app/versions.py``
(``LoadedVersions``); this service asks it for a version's backend and pins it for the length of a turn.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator

from app.admission import FairGate
from app.backends.base import Backend, Busy, Chunk
from app.feedback_desk import FeedbackDesk, NotYours
from app.metrics import Metrics
from app.router import ReleaseRouter
from app.sessions import Sessions, TurnRecord
from app.turn_stream import TurnStream
from app.validation import InputError, Limits, check_conversation
from app.versions import LoadedVersions
from feedback.events import (
    ChatTurn,
    Message,
    Origin,
    Sampling,
)
from feedback.producer import EventProducer, SpoolFull
from feedback.settings import Settings

log = logging.getLogger(__name__)

BUSY_MESSAGE = "The model is busy, please retry in a moment."

__all__ = ["BUSY_MESSAGE", "Busy", "ChatService", "NotYours", "TurnStream"]


def _charge_usage(gate: FairGate, bucket: str, turn: TurnStream) -> None:
    """A backend that does not charge as it computes (a model server) is charged an answer's usage when it ends."""
    computed = max(0, (turn.prompt_tokens or 0) - (turn.cached_tokens or 0))
    gate.counters.charge(bucket, prefill=computed, decode=turn.completion_tokens or 0)


class ChatService(FeedbackDesk):
    """Serving (routing, streaming, recording each turn) plus the ratings, reports and consent of
    ``FeedbackDesk`` (``app/feedback_desk.py``)."""

    def __init__(
        self,
        settings: Settings,
        backends: dict[str, Backend],
        router: ReleaseRouter,
        sessions: Sessions,
        producer: EventProducer,
        metrics: Metrics,
    ):
        self.versions = LoadedVersions(settings, backends, router, metrics)  # refuses an empty ``backends``
        self.settings = settings
        self.router = router
        self.sessions = sessions
        self.producer = producer
        self.metrics = metrics
        FeedbackDesk.__init__(self)
        self.fallbacks: set[str] = set()
        self._gates: weakref.WeakKeyDictionary[Backend, FairGate] = weakref.WeakKeyDictionary()
        self._gates_mu = threading.Lock()
        self.open_turns = 0  # started and not yet completed: every one holds a backend slot
        router.listeners.append(self.versions.prepare)
        if router.published:  # a cached plan (Kafka may be down): load what it names now
            self.versions.prepare(router.plan)

    # ---- the loaded versions (``app/versions.py``), as the API, the server and the tests read them -------
    @property
    def backends(self) -> dict[str, Backend]:
        return self.versions.backends

    @property
    def loaded(self) -> dict[str, Backend]:
        return self.versions.loaded

    @property
    def load_errors(self) -> dict[str, str]:
        return self.versions.load_errors

    @property
    def unloaded(self) -> list[str]:
        return self.versions.unloaded

    def forget_cached_prompts(self, user_id: str) -> int:
        """Every loaded version drops the prompt prefixes it cached for ``user_id``; returns the slots cleared."""
        return self.versions.forget_cached_prompts(user_id)

    # ---- routing ---------------------------------------------------------------------------------
    @property
    def default_version(self) -> str:
        return self.versions.default_version

    def missing_backends(self) -> list[str]:
        return [v for v in self.router.plan.versions() if v not in self.backends]

    def resolve(self, user_id: str, requested: str | None = None) -> str:
        """The version that answers: an explicitly requested one that is loaded, else the user's release (a
        requested version that may be served on request starts loading for the requests after this one)."""
        if requested and requested in self.backends:
            return requested
        if requested:
            self.versions.load_on_request(requested)
        version = self.router.assign(user_id)
        if version not in self.backends:
            if version not in self.fallbacks:
                log.warning(
                    "release plan names %r but no backend serves it; falling back to %r", version, self.default_version
                )
                self.fallbacks.add(version)
            return self.default_version
        return version

    def compare_versions(self, user_id: str) -> tuple[str, str]:
        """Two releases when the plan has two live ones with backends, else the user's release twice."""
        mine = self.resolve(user_id)
        others = [v for v in self.router.plan.versions() if v in self.backends and v != mine]
        return (mine, others[0]) if others else (mine, mine)

    # ---- limits ----------------------------------------------------------------------------------
    def version_for(self, user_id: str, requested: str | None = None) -> str:
        """The version that would answer this user now (a served ``requested`` version pins it)."""
        return self.resolve(user_id, requested)

    def limits(self, version: str | None = None) -> Limits:
        """Input limits of ``version`` (default: the default version), derived from its context window."""
        backend = self.backends.get(version or self.default_version) or self.backends[self.default_version]
        context = getattr(backend, "max_context_tokens", None) or self.settings.app_context_tokens
        return Limits.from_settings(int(context), self.settings)

    # ---- generation ------------------------------------------------------------------------------
    async def start_turn(
        self,
        *,
        user_id: str,
        conversation_id: str,
        messages: list[dict[str, str]],
        sampling: Sampling,
        origin: Origin,
        surface: str,
        parent_turn_id: str | None = None,
        model_version: str | None = None,
        consent: bool | None = None,
        bucket: str | None = None,
    ) -> TurnStream:
        """Raises ``InputError`` for bad input and ``Busy`` past the backend's bound, before any output.

        ``bucket`` names the party the answer counts against for fair admission and batching (an API key;
        default: the user), see ``app.admission.FairGate`` and ``app.vtc``.

        On any failure the backend stream is closed before this returns; on success the caller owns the turn
        and must read or close it (``async with turn`` or ``aclosing(turn.deltas())``)."""
        version = self.version_for(user_id, model_version)
        limits = self.limits(version)
        messages = check_conversation(messages, limits)
        if sampling.max_new_tokens > limits.max_new_tokens:
            raise InputError(f"max_tokens must be between 1 and {limits.max_new_tokens}.", "max_tokens")
        if consent is None:
            consent = self.sessions.consent(user_id)
        version, backend = self.versions.pin(version)  # released in finish_turn, or below on failure
        bucket = bucket or user_id
        gate = self._gate(backend)
        t0 = time.perf_counter()  # time to first token includes the wait for a fair turn
        try:
            await self._admit(gate, bucket, surface, version)
        except BaseException:
            self.versions.unpin(version)
            raise
        try:
            agen = backend.stream(messages, sampling, cache_scope=user_id, party=bucket)
        except BaseException:
            gate.release(bucket)
            self.versions.unpin(version)
            raise
        try:
            first = await self._first_chunk(agen, surface, version)
            turn = TurnStream(
                service=self,
                backend=backend,
                agen=agen,
                first=first,
                user_id=user_id,
                conversation_id=conversation_id,
                model_version=version,
                messages=messages,
                sampling=sampling,
                origin=origin,
                surface=surface,
                parent_turn_id=parent_turn_id,
                t0=t0,
                consent=consent,
            )
            turn.claim_timer = asyncio.get_running_loop().call_later(self.settings.app_turn_claim_s, turn._expire)
        except BaseException:
            try:
                await agen.aclose()  # type: ignore[attr-defined]  # whatever failed, the slot is free again
            finally:
                gate.release(bucket)
                self.versions.unpin(version)
            raise
        if getattr(backend, "counters", None) is not gate.counters:  # the engine does not charge as it computes
            turn.on_complete.append(functools.partial(_charge_usage, gate, bucket, turn))
        turn.on_complete.append(functools.partial(gate.release, bucket))
        self.metrics.in_flight.labels(version).inc()
        self.open_turns += 1
        return turn

    def _gate(self, backend: Backend) -> FairGate:
        """The fair admission gate in front of ``backend`` (one per backend object, sized by its bounds)."""
        with self._gates_mu:
            gate = self._gates.get(backend)
            if gate is None:
                gate = FairGate(
                    getattr(backend, "max_concurrency", 8),
                    getattr(backend, "max_queue", 16),
                    getattr(backend, "counters", None),  # the engine's own, charged as it computes
                )
                self._gates[backend] = gate
            return gate

    async def _admit(self, gate: FairGate, bucket: str, surface: str, version: str) -> None:
        try:
            await gate.acquire(bucket)
        except Busy:
            self.metrics.requests.labels(surface, version, "busy").inc()
            raise

    async def _first_chunk(self, agen: AsyncIterator[Chunk], surface: str, version: str) -> Chunk | None:
        try:
            return await agen.__anext__()
        except StopAsyncIteration:
            return None
        except Busy:
            self.metrics.requests.labels(surface, version, "busy").inc()
            raise
        except ValueError as e:  # the backend refused the prompt itself (e.g. longer than the model's context)
            self.metrics.requests.labels(surface, version, "invalid").inc()
            raise InputError(f"The model cannot take this conversation: {e}. Please shorten it.", "messages") from e
        except Exception:
            self.metrics.requests.labels(surface, version, "error").inc()
            raise

    def finish_turn(self, t: TurnStream) -> None:
        """Once per turn (``TurnStream`` calls it as it ends): free its accounting, record it, emit its event, then
        run its completion callbacks."""
        if t.done:
            return
        t.done = True
        t._claim()
        self.open_turns -= 1
        self.versions.unpin(t.model_version)
        t.latency_ms = (time.perf_counter() - t.t0) * 1000
        try:
            self._observe(t)
            self.sessions.record_turn(TurnRecord(t.turn_id, t.user_id, t.conversation_id, t.model_version))
            self.producer.emit(
                ChatTurn(
                    user_id=t.user_id,
                    consent=t.consent,
                    conversation_id=t.conversation_id,
                    turn_id=t.turn_id,
                    model_version=t.model_version,
                    messages=[Message(**x) for x in t.messages],
                    answer=t.text,
                    sampling=t.sampling,
                    latency_ms=t.latency_ms,
                    ttft_ms=t.ttft_ms,
                    prompt_tokens=t.prompt_tokens,
                    completion_tokens=t.completion_tokens,
                    finish_reason=t.finish_reason,
                    origin=t.origin,
                    parent_turn_id=t.parent_turn_id,
                )
            )
        except SpoolFull as e:  # not recorded: the API answers 503 (a clear error), never a normal answer
            t.unrecorded = True
            log.error("turn %s not recorded: %s", t.turn_id, e)
        except Exception:  # noqa: BLE001 - the answer was delivered; losing its event must not crash the request
            log.exception("could not record turn %s", t.turn_id)
        finally:
            for callback in t.on_complete:
                try:
                    callback()
                except Exception:  # noqa: BLE001 - one failing callback must not keep the others from running
                    log.exception("a completion callback of turn %s failed", t.turn_id)

    def _observe(self, t: TurnStream) -> None:
        m = self.metrics
        m.in_flight.labels(t.model_version).dec()
        m.requests.labels(t.surface, t.model_version, t.finish_reason).inc()
        m.latency.labels(t.surface, t.model_version).observe(t.latency_ms / 1000)
        if t.ttft_ms is not None:
            m.ttft.labels(t.surface, t.model_version).observe(t.ttft_ms / 1000)
        if t.prompt_tokens:
            m.tokens.labels(t.model_version, "prompt").inc(t.prompt_tokens)
        if t.completion_tokens:
            m.tokens.labels(t.model_version, "completion").inc(t.completion_tokens)
        if t.cached_tokens:
            m.tokens.labels(t.model_version, "prompt_cached").inc(t.cached_tokens)
