"""One answer, start to finish, for the UI and the API alike: route, stream, then record and emit.

``ChatService.start_turn`` picks the user's release, starts the backend's stream and waits for the first
chunk, so ``Busy`` and input errors surface before a response has begun (a 429 or a polite message, never a
half-open stream). Iterating the returned ``TurnStream`` yields text deltas; when it ends -- finished,
cut at the length limit, or cancelled by a client that went away -- it records who was served the turn and
emits exactly one ``ChatTurn`` through the process's producer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from app.backends.base import Backend, Busy, Chunk
from app.metrics import Metrics
from app.router import ReleasePlan, ReleaseRouter
from app.sessions import Sessions, TurnRecord
from app.validation import InputError, check_conversation
from feedback.events import ChatTurn, Feedback, Message, Sampling, UserAction, new_id
from feedback.producer import EventProducer
from feedback.settings import Settings

log = logging.getLogger(__name__)

Origin = Literal["new", "regenerate", "edit", "compare", "api"]
BUSY_MESSAGE = "The model is busy, please retry in a moment."

__all__ = ["BUSY_MESSAGE", "Busy", "ChatService", "TurnStream"]


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
    finish_reason: Literal["stop", "length", "cancelled", "error"] = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    latency_ms: float | None = None
    done: bool = False

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas. Consume with ``contextlib.aclosing`` so a client that leaves ends the turn at once."""
        finish = "cancelled"
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
                pass
            self.service._complete(self)


class ChatService:
    def __init__(
        self,
        settings: Settings,
        backends: dict[str, Backend],
        router: ReleaseRouter,
        sessions: Sessions,
        producer: EventProducer,
        metrics: Metrics,
    ):
        if not backends:
            raise ValueError("at least one backend is needed")
        self.settings = settings
        self.backends = backends
        self.router = router
        self.sessions = sessions
        self.producer = producer
        self.metrics = metrics
        self.fallbacks: set[str] = set()
        self.loaded: dict[str, Backend] = {}  # loaded here for a new plan; closed by the app at shutdown
        self.load_errors: dict[str, str] = {}
        self._loading: set[str] = set()
        self._load_mu = threading.Lock()
        for version, backend in backends.items():
            metrics.watch_backend(version, backend.load)
        router.listeners.append(self.prepare)

    # ---- backends for new releases ---------------------------------------------------------------
    def _spec_for(self, version: str) -> dict | None:
        """How to serve a version: its entry in ``backends.yaml``, else a model directory of that name."""
        from app.backends.registry import backend_config

        try:
            spec = backend_config(self.settings).get(version)
        except ValueError as e:
            log.warning("cannot read the backend config: %s", e)
            spec = None
        if spec is None and (self.settings.models_dir / version / "config.json").exists():
            spec = {"kind": "embedded", "path": str(self.settings.models_dir / version)}
        return spec

    def prepare(self, plan: ReleasePlan) -> None:
        """Start loading a backend for every version the plan names that none serves yet (in the background:
        until it is ready, its users are served by the fallback)."""
        for version in plan.versions():
            with self._load_mu:
                if version in self.backends or version in self._loading:
                    continue
                spec = self._spec_for(version)
                if spec is None:
                    continue
                self._loading.add(version)
            threading.Thread(target=self._load, args=(version, spec), name=f"load-{version}", daemon=True).start()

    def _load(self, version: str, spec: dict) -> None:
        from app.backends.registry import build_backend

        try:
            backend = build_backend(spec, base_dir=self.settings.home)
        except Exception as e:  # noqa: BLE001 - reported in /healthz; the fallback keeps serving
            log.exception("could not load a backend for %s", version)
            self.load_errors[version] = f"{type(e).__name__}: {e}"
        else:
            self.loaded[version] = backend
            self.metrics.watch_backend(version, backend.load)
            self.backends = {**self.backends, version: backend}  # copy-on-write: readers never see a half dict
            self.load_errors.pop(version, None)
            log.info("model version %s is now served by %s", version, backend.name)
        finally:
            with self._load_mu:
                self._loading.discard(version)

    # ---- routing ---------------------------------------------------------------------------------
    @property
    def default_version(self) -> str:
        base = self.settings.model_version
        return base if base in self.backends else next(iter(self.backends))

    def missing_backends(self) -> list[str]:
        return [v for v in self.router.plan.versions() if v not in self.backends]

    def resolve(self, user_id: str, requested: str | None = None) -> str:
        """The version that answers: an explicitly requested one that exists, else the user's release."""
        if requested and requested in self.backends:
            return requested
        version = self.router.assign(user_id)
        if version not in self.backends:
            if version not in self.fallbacks:
                log.warning("release plan names %r but no backend serves it; falling back to %r",
                            version, self.default_version)
                self.fallbacks.add(version)
            return self.default_version
        return version

    def compare_versions(self, user_id: str) -> tuple[str, str]:
        """Two releases when the plan has two live ones with backends, else the user's release twice."""
        mine = self.resolve(user_id)
        others = [v for v in self.router.plan.versions() if v in self.backends and v != mine]
        return (mine, others[0]) if others else (mine, mine)

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
    ) -> TurnStream:
        """Raises ``InputError`` for bad input and ``Busy`` past the backend's bound, before any output."""
        messages = check_conversation(messages)
        version = model_version if model_version in self.backends else self.resolve(user_id)
        backend = self.backends[version]
        t0 = time.perf_counter()
        agen = backend.stream(messages, sampling)
        try:
            first = await agen.__anext__()
        except StopAsyncIteration:
            first = None
        except Busy:
            self.metrics.requests.labels(surface, version, "busy").inc()
            raise
        except ValueError as e:  # the backend refused the prompt itself (e.g. longer than the model's context)
            self.metrics.requests.labels(surface, version, "invalid").inc()
            raise InputError(f"The model cannot take this conversation: {e}. Please shorten it.", "messages") from e
        except Exception:
            self.metrics.requests.labels(surface, version, "error").inc()
            raise
        self.metrics.in_flight.labels(version).inc()
        return TurnStream(
            service=self, backend=backend, agen=agen, first=first, user_id=user_id,
            conversation_id=conversation_id, model_version=version, messages=messages, sampling=sampling,
            origin=origin, surface=surface, parent_turn_id=parent_turn_id, t0=t0,
            consent=self.sessions.consent(user_id) if consent is None else consent,
        )

    def _complete(self, t: TurnStream) -> None:
        if t.done:
            return
        t.done = True
        t.latency_ms = (time.perf_counter() - t.t0) * 1000
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
        try:
            self.sessions.record_turn(TurnRecord(t.turn_id, t.user_id, t.conversation_id, t.model_version))
            self.producer.emit(
                ChatTurn(
                    user_id=t.user_id, consent=t.consent, conversation_id=t.conversation_id, turn_id=t.turn_id,
                    model_version=t.model_version, messages=[Message(**x) for x in t.messages], answer=t.text,
                    sampling=t.sampling, latency_ms=t.latency_ms, ttft_ms=t.ttft_ms, prompt_tokens=t.prompt_tokens,
                    completion_tokens=t.completion_tokens, finish_reason=t.finish_reason, origin=t.origin,
                    parent_turn_id=t.parent_turn_id,
                )
            )
        except Exception:  # noqa: BLE001 - the answer was delivered; losing its event must not crash the request
            log.exception("could not record turn %s", t.turn_id)

    # ---- feedback and consent --------------------------------------------------------------------
    def rate(
        self,
        user_id: str,
        turn: TurnRecord,
        value: Literal["up", "down", "cleared", "a", "b", "tie"],
        *,
        reason: str | None = None,
        other: TurnRecord | None = None,
        consent: bool | None = None,
    ) -> Feedback:
        """Emit one rating of a turn this user owns (callers check ownership with ``Sessions.owned_turn``)."""
        if turn.user_id != user_id or (other is not None and other.user_id != user_id):
            raise PermissionError("a user can rate only answers given to them")
        fb = Feedback(
            user_id=user_id, consent=self.sessions.consent(user_id) if consent is None else consent,
            conversation_id=turn.conversation_id, turn_id=turn.turn_id, model_version=turn.model_version,
            kind="pairwise" if other is not None else "thumbs", value=value, reason=reason,
            other_turn_id=other.turn_id if other else None, other_model_version=other.model_version if other else None,
        )
        self.producer.emit(fb)
        self.metrics.ratings.labels(turn.model_version, fb.kind, value).inc()
        return fb

    def set_consent(self, user_id: str, consent: bool) -> None:
        if self.sessions.set_consent(user_id, consent):
            self.producer.emit(
                UserAction(user_id=user_id, consent=consent, action="consent_granted" if consent else "consent_revoked")
            )
