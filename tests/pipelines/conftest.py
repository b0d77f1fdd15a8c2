"""Fixtures for the pipeline tests: a fresh FLYWHEEL_HOME with a real DuckDB warehouse, event builders, and one
Prefect test harness per session (it starts a temporary API server, which takes several seconds)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from feedback.events import ChatTurn, Feedback, Message, UserAction
from feedback.settings import Settings
from feedback.sink import insert_events
from feedback.warehouse import connect, ensure_schema
from pipelines.config import CurateConfig

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


class Events:
    """Builds events with deterministic ids and increasing timestamps, so that the same test input gives the
    same snapshot."""

    def __init__(self) -> None:
        self.n = 0
        self.items: list[ChatTurn | Feedback | UserAction] = []

    def _next(self) -> tuple[str, datetime]:
        self.n += 1
        return f"ev{self.n:06d}", T0 + timedelta(seconds=self.n)

    def turn(
        self,
        user: str,
        conv: str,
        tid: str,
        prompt: str | list[tuple[str, str]],
        answer: str,
        *,
        consent: bool = True,
        origin: str = "new",
        parent: str | None = None,
        finish: str = "stop",
    ) -> ChatTurn:
        eid, ts = self._next()
        msgs = (
            [Message(role="user", content=prompt)]
            if isinstance(prompt, str)
            else [Message(role=r, content=c) for r, c in prompt]
        )
        ev = ChatTurn(
            event_id=eid,
            ts=ts,
            user_id=user,
            consent=consent,
            conversation_id=conv,
            turn_id=tid,
            model_version="base",
            messages=msgs,
            answer=answer,
            latency_ms=10.0,
            origin=origin,
            parent_turn_id=parent,
            finish_reason=finish,
        )
        self.items.append(ev)
        return ev

    def thumbs(
        self, user: str, conv: str, tid: str, value: str, reason: str | None = None, *, consent: bool = True
    ) -> Feedback:
        eid, ts = self._next()
        ev = Feedback(
            event_id=eid,
            ts=ts,
            user_id=user,
            consent=consent,
            conversation_id=conv,
            turn_id=tid,
            model_version="base",
            kind="thumbs",
            value=value,
            reason=reason,
        )
        self.items.append(ev)
        return ev

    def pairwise(self, user: str, conv: str, a: str, b: str, value: str) -> Feedback:
        eid, ts = self._next()
        ev = Feedback(
            event_id=eid,
            ts=ts,
            user_id=user,
            consent=True,
            conversation_id=conv,
            turn_id=a,
            other_turn_id=b,
            model_version="base",
            kind="pairwise",
            value=value,
        )
        self.items.append(ev)
        return ev

    def action(self, user: str, action: str) -> UserAction:
        eid, ts = self._next()
        ev = UserAction(event_id=eid, ts=ts, user_id=user, consent=action != "consent_revoked", action=action)
        self.items.append(ev)
        return ev

    def rated(self, user: str, conv: str, tid: str, prompt: str, answer: str, value: str, **kw) -> None:
        self.turn(user, conv, tid, prompt, answer, **kw)
        self.thumbs(user, conv, tid, value, consent=kw.get("consent", True))


def seed(path: Path, events: list) -> dict[str, int]:
    ensure_schema(path)
    with connect(path) as con:
        return insert_events(con, events)


@pytest.fixture
def home_settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home")


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def cfg() -> CurateConfig:
    return CurateConfig(eval_fraction=0.3)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Prefect's test harness (a temporary API server in a subprocess). A server that did not answer in time is
    left running by Prefect; it is stopped here, so a slow start fails the tests, not the next run's ports."""
    import psutil
    from prefect.testing.utilities import prefect_test_harness

    before = {p.pid for p in psutil.Process().children()}
    try:
        harness = prefect_test_harness(server_startup_timeout=240)  # 3 workers on 2 cores: starts take longer
        harness.__enter__()
    except BaseException:
        for p in psutil.Process().children():
            try:
                if p.pid not in before and "prefect.server" in " ".join(p.cmdline()):
                    p.kill()
            except psutil.Error:
                continue
        raise
    try:
        yield
    finally:
        harness.__exit__(None, None, None)
