"""One answer, start to finish, for the UI and the API alike: route, stream, then record and emit.

``ChatService.start_turn`` picks the user's release, starts the backend's stream and waits for the first
chunk, so ``Busy`` and input errors surface before a response has begun (a 429 or a polite message, never a
half-open stream). Iterating the returned ``TurnStream`` yields text deltas; when it ends -- finished,
cut at the length limit, or cancelled by a client that went away -- it records who was served the turn and
emits exactly one ``ChatTurn`` through the process's producer.

A started answer holds a generation slot in its backend, and no path may keep it: ``start_turn`` closes the
backend stream on any failure before it returns, ``TurnStream.aclose`` (or ``async with``) frees a turn whose
deltas were never read, and a turn nobody starts reading within ``app_turn_claim_s`` is closed by a timer, so
even a caller that drops a turn on the floor cannot leak the slot. ``ChatService.rate`` is the one way in for a
rating, and it checks that the turns were served to the rater itself.

Model versions come and go without a restart: a version a release plan names is loaded in the background (its
users are served by the default version until it is ready), and so is a vetted registered version that a request
names (its lineage says it passed its gate and is not tainted). At most ``app_max_loaded_versions`` stay loaded:
past the bound the least recently used one is unloaded and its backend closed, never the default version, one
the plan names, or one with answers in flight (every turn pins its version until it completes).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from app.admission import FairGate
from app.backends.base import Backend, Busy, Chunk
from app.metrics import Metrics
from app.router import ReleasePlan, ReleaseRouter, servable_dir
from app.sessions import Sessions, TurnRecord
from app.validation import InputError, Limits, check_conversation
from feedback.events import (
    THUMBS_VALUES,
    ChatTurn,
    Feedback,
    FinishReason,
    Message,
    Origin,
    RatingValue,
    Sampling,
    UserAction,
    new_id,
)
from feedback.producer import EventProducer, SpoolFull
from feedback.settings import Settings

log = logging.getLogger(__name__)

BUSY_MESSAGE = "The model is busy, please retry in a moment."

__all__ = ["BUSY_MESSAGE", "Busy", "ChatService", "NotYours", "TurnStream"]


class NotYours(PermissionError):
    """A rating names a turn that was not served to the rater (unknown and foreign look the same)."""

    message = "You can rate only answers that were given to you."


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
            self.service._complete(self)

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
            self.service._complete(self)


def _close_backend(version: str, backend: Backend) -> None:
    """Close an unloaded backend on its own thread (a decode thread may take a moment to stop)."""
    try:
        asyncio.run(backend.aclose())
    except Exception:  # noqa: BLE001 - the version is unloaded either way; its memory goes with the last reference
        log.exception("closing the unloaded backend of %s failed", version)


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
        self._gates: weakref.WeakKeyDictionary[Backend, FairGate] = weakref.WeakKeyDictionary()
        self.open_turns = 0  # started and not yet completed: every one holds a backend slot
        self.loaded: dict[str, Backend] = {}  # loaded here (plan or request); closed when unloaded or at shutdown
        self.load_errors: dict[str, str] = {}
        self.unloaded: list[str] = []  # versions unloaded past app_max_loaded_versions, in order
        self._loading: set[str] = set()
        self._requested_load: str | None = None  # the one version being loaded because a request named it
        self._load_mu = threading.RLock()
        self._in_use: dict[str, int] = {}  # turns in flight per version (never unloaded while > 0)
        self._last_used: dict[str, float] = {}
        for version, backend in backends.items():
            metrics.watch_backend(version, backend.load)
        router.listeners.append(self.prepare)
        if router.published:  # a cached plan (Kafka may be down): load what it names now
            self.prepare(router.plan)

    # ---- backends for new releases ---------------------------------------------------------------
    def _spec_for(self, version: str) -> dict | None:
        """How to serve a version: its entry in ``backends.yaml``, else a model directory of that name."""
        from app.backends.registry import backend_config

        try:
            spec = backend_config(self.settings).get(version)
        except ValueError as e:
            log.warning("cannot read the backend config: %s", e)
            spec = None
        if spec is None and (path := servable_dir(self.settings, version)) is not None:
            spec = {"kind": "embedded", "path": str(path)}
        return spec

    def prepare(self, plan: ReleasePlan) -> None:
        """Start loading a backend for every version the plan names that none serves yet (in the background:
        until it is ready, its users are served by the fallback); versions the plan dropped may now be unloaded."""
        for version in plan.versions():
            with self._load_mu:
                if version in self.backends or version in self._loading:
                    continue
                spec = self._spec_for(version)
                if spec is None:
                    continue
                self._loading.add(version)
            self._start_load(version, spec)
        self._evict()

    def _start_load(self, version: str, spec: dict) -> None:
        threading.Thread(target=self._load, args=(version, spec), name=f"load-{version}", daemon=True).start()

    def _load_on_request(self, version: str) -> None:
        """A request named a version nobody serves: load it in the background if it may be served on request
        (one such load at a time, so requests cannot make the app churn through models; none while the default
        and the plan's versions fill ``app_max_loaded_versions``, as it would be unloaded as soon as it loaded)."""
        keep = {*self.router.plan.versions(), self.default_version}
        with self._load_mu:
            if version in self.backends or version in self._loading or self._requested_load is not None:
                return
            if len(keep & set(self.backends)) >= self.settings.app_max_loaded_versions:
                return
            spec = self._requestable_spec(version)
            if spec is None:
                return
            self._loading.add(version)
            self._requested_load = version
        log.info("loading model version %s because a request named it", version)
        self._start_load(version, spec)

    def _requestable_spec(self, version: str) -> dict | None:
        """How to serve ``version`` on request: an operator's ``backends.yaml`` entry, or a registered chat model
        whose ``lineage.json`` says it passed its gate and is not tainted (a plan may name any servable version;
        a request may not bring an unvetted, tainted or reward model online)."""
        spec = self._spec_for(version)
        if spec is None or spec.get("kind") != "embedded" or version == self.settings.model_version:
            return spec
        path = servable_dir(self.settings, version)
        if path is None:
            return spec  # a backends.yaml entry of the operator's own
        try:
            lineage = json.loads((path / "lineage.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(lineage, dict):
            return None
        vetted = lineage.get("kind", "policy") == "policy" and lineage.get("gate") == "passed"
        return spec if vetted and lineage.get("tainted") is False else None

    def _load(self, version: str, spec: dict) -> None:
        from app.backends.registry import build_backend

        try:
            backend = build_backend(spec, base_dir=self.settings.home, settings=self.settings)
        except Exception as e:  # noqa: BLE001 - reported in /healthz; the fallback keeps serving
            log.exception("could not load a backend for %s", version)
            self.load_errors[version] = f"{type(e).__name__}: {e}"
        else:
            with self._load_mu:
                self.loaded[version] = backend
                self._last_used[version] = time.monotonic()
                self.metrics.watch_backend(version, backend.load)
                self.backends = {**self.backends, version: backend}  # copy-on-write: readers never see a half dict
                self.load_errors.pop(version, None)
            log.info("model version %s is now served by %s", version, backend.name)
        finally:
            with self._load_mu:
                self._loading.discard(version)
                if self._requested_load == version:
                    self._requested_load = None
        self._evict()

    # ---- unloading past the bound ----------------------------------------------------------------
    def _evict(self) -> None:
        """Past ``app_max_loaded_versions``, unload the least recently used versions this service loaded (never the
        default or one the plan names) and close their backends. "Used" is loaded or given a turn; a victim with a
        turn in flight stays until that turn completes (its completion calls this again), so a busy old version
        never makes a freshly loaded one go instead."""
        keep = {*self.router.plan.versions(), self.default_version}
        with self._load_mu:
            excess = len(self.backends) - self.settings.app_max_loaded_versions
            if excess <= 0:
                return
            oldest = sorted((v for v in self.loaded if v not in keep), key=lambda v: self._last_used.get(v, 0.0))
            victims = {v: self.loaded.pop(v) for v in oldest[:excess] if not self._in_use.get(v)}
            if not victims:
                return
            self.backends = {v: b for v, b in self.backends.items() if v not in victims}  # copy-on-write
            for version in victims:
                self.metrics.unwatch_backend(version)
                self._last_used.pop(version, None)
                self.unloaded.append(version)
        for version, backend in victims.items():
            log.info(
                "unloading model version %s (least recently used past %d loaded versions)",
                version,
                self.settings.app_max_loaded_versions,
            )
            threading.Thread(
                target=_close_backend, args=(version, backend), name=f"unload-{version}", daemon=True
            ).start()

    def forget_cached_prompts(self, user_id: str) -> int:
        """Every loaded version drops the prompt prefixes it cached for ``user_id``; returns the slots cleared."""
        return sum(
            forget(user_id)
            for backend in list(self.backends.values())
            if (forget := getattr(backend, "forget_scope", None)) is not None
        )

    def _pin(self, version: str) -> tuple[str, Backend]:
        """Mark one more turn in flight on ``version`` (the default if it was unloaded a moment ago)."""
        with self._load_mu:
            backend = self.backends.get(version)
            if backend is None:
                version = self.default_version
                backend = self.backends[version]
            self._in_use[version] = self._in_use.get(version, 0) + 1
            self._last_used[version] = time.monotonic()
            return version, backend

    def _unpin(self, version: str) -> None:
        with self._load_mu:
            left = self._in_use.get(version, 0) - 1
            if left > 0:
                self._in_use[version] = left
            else:
                self._in_use.pop(version, None)
        if left <= 0:
            self._evict()

    # ---- routing ---------------------------------------------------------------------------------
    @property
    def default_version(self) -> str:
        base = self.settings.model_version
        return base if base in self.backends else next(iter(self.backends))

    def missing_backends(self) -> list[str]:
        return [v for v in self.router.plan.versions() if v not in self.backends]

    def resolve(self, user_id: str, requested: str | None = None) -> str:
        """The version that answers: an explicitly requested one that is loaded, else the user's release (a
        requested version that may be served on request starts loading for the requests after this one)."""
        if requested and requested in self.backends:
            return requested
        if requested:
            self._load_on_request(requested)
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

        ``bucket`` names the party the answer counts against for fair admission (an API key; default: the user),
        see ``app.admission.FairGate``.

        On any failure the backend stream is closed before this returns; on success the caller owns the turn
        and must read or close it (``async with turn`` or ``aclosing(turn.deltas())``)."""
        version = self.version_for(user_id, model_version)
        limits = self.limits(version)
        messages = check_conversation(messages, limits)
        if sampling.max_new_tokens > limits.max_new_tokens:
            raise InputError(f"max_tokens must be between 1 and {limits.max_new_tokens}.", "max_tokens")
        if consent is None:
            consent = self.sessions.consent(user_id)
        version, backend = self._pin(version)  # released in _complete, or below on failure
        bucket = bucket or user_id
        gate = self._gate(backend)
        t0 = time.perf_counter()  # time to first token includes the wait for a fair turn
        try:
            await self._admit(gate, bucket, surface, version)
        except BaseException:
            self._unpin(version)
            raise
        try:
            agen = backend.stream(messages, sampling, cache_scope=user_id)
        except BaseException:
            gate.release(bucket)
            self._unpin(version)
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
                self._unpin(version)
            raise
        turn.on_complete.append(functools.partial(gate.release, bucket))
        self.metrics.in_flight.labels(version).inc()
        self.open_turns += 1
        return turn

    def _gate(self, backend: Backend) -> FairGate:
        """The fair admission gate in front of ``backend`` (one per backend object, sized by its bounds)."""
        with self._load_mu:
            gate = self._gates.get(backend)
            if gate is None:
                gate = FairGate(getattr(backend, "max_concurrency", 8), getattr(backend, "max_queue", 16))
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

    def _complete(self, t: TurnStream) -> None:
        """Once per turn: free its accounting, record it, emit its event, then run its completion callbacks."""
        if t.done:
            return
        t.done = True
        t._claim()
        self.open_turns -= 1
        self._unpin(t.model_version)
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

    # ---- feedback and consent --------------------------------------------------------------------
    def rate(
        self,
        user_id: str,
        turn_id: str,
        value: RatingValue,
        *,
        reason: str | None = None,
        other_turn_id: str | None = None,
        consent: bool | None = None,
    ) -> Feedback:
        """Emit one rating by ``user_id`` of a turn served to them (pairwise: ``other_turn_id`` is B, also theirs).

        The one way in for a rating: ownership is checked here, so no caller can forget it. Raises ``NotYours``
        for a turn that is not theirs and ``InputError`` for a value that does not fit the kind."""
        if (other_turn_id is None) != (value in THUMBS_VALUES):
            raise InputError("Use rating up/down/cleared for one answer, or a/b/tie with other_turn_id.", "rating")
        turn = self.sessions.owned_turn(user_id, turn_id)
        other = self.sessions.owned_turn(user_id, other_turn_id) if other_turn_id is not None else None
        if turn is None or (other_turn_id is not None and other is None):
            raise NotYours(NotYours.message)
        fb = Feedback(
            user_id=user_id,
            consent=self.sessions.consent(user_id) if consent is None else consent,
            conversation_id=turn.conversation_id,
            turn_id=turn.turn_id,
            model_version=turn.model_version,
            kind="pairwise" if other is not None else "thumbs",
            value=value,
            reason=reason,
            other_turn_id=other.turn_id if other else None,
            other_model_version=other.model_version if other else None,
        )
        self.producer.emit(fb)
        self.metrics.ratings.labels(turn.model_version, fb.kind, value).inc()
        return fb

    def set_consent(self, user_id: str, consent: bool) -> None:
        """Event first, local state second: if the event cannot be recorded (``SpoolFull``) the stored consent
        is unchanged, so the next toggle emits again; a change is never lost silently."""
        if self.sessions.stored_consent(user_id) == consent:
            return
        self.producer.emit(
            UserAction(user_id=user_id, consent=consent, action="consent_granted" if consent else "consent_revoked")
        )
        self.sessions.set_consent(user_id, consent)
