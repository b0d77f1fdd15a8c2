"""Ratings, reports and consent changes: the feedback half of the chat service (``ChatService`` in
``app/service.py`` inherits it).

``rate`` is the one way in for a rating and checks that the rated turns were served to the rater, so no caller can
forget it. With the shared database down (``StoreDown``) a rating this replica cannot vouch for waits in the
replica's outbox (``app/outbox.py``) and is replayed, or dropped, when the database answers (``_replay_rating``).
``report`` sends an end user's report to the review queue through ``report_listeners``; ``withdraw`` tells every
store a user's withdrawal must reach (``withdrawal_listeners``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from app.database import StoreDown
from app.metrics import Metrics
from app.outbox import DONE, DROP, LATER
from app.sessions import Sessions
from app.validation import InputError
from feedback.events import THUMBS_VALUES, Feedback, RatingValue, ReportCategory, UserAction, UserReport
from feedback.producer import EventProducer

log = logging.getLogger(__name__)

RATING_HOLD_S = 900.0  # an outbox rating of a turn not (yet) known to be the rater's is kept this long


class NotYours(PermissionError):
    """A rating names a turn that was not served to the rater (unknown and foreign look the same)."""

    message = "You can rate only answers that were given to you."


class FeedbackDesk:
    """Needs ``sessions``, ``producer`` and ``metrics`` on the instance before ``__init__`` runs."""

    sessions: Sessions
    producer: EventProducer
    metrics: Metrics

    def __init__(self) -> None:
        if self.sessions.outbox is not None:
            self.sessions.outbox.handlers["rating"] = self._replay_rating
        self.report_listeners: list[Callable[[UserReport, tuple[list[dict[str, str]], str] | None], None]] = []
        # other stores a user's withdrawal must reach, called with (user_id, deleted): a deletion (True) or a
        # revoked consent (False); e.g. the trainers' queue (``TaskQueue.forget_user``)
        self.withdrawal_listeners: list[Callable[[str, bool], object]] = []

    def rate(
        self,
        user_id: str,
        turn_id: str,
        value: RatingValue,
        *,
        reason: str | None = None,
        other_turn_id: str | None = None,
        consent: bool | None = None,
    ) -> Feedback | None:
        """Emit one rating by ``user_id`` of a turn served to them (pairwise: ``other_turn_id`` is B, also theirs).

        The one way in for a rating: ownership is checked here, so no caller can forget it. Raises ``NotYours``
        for a turn that is not theirs and ``InputError`` for a value that does not fit the kind.

        With the shared database down and a turn this replica cannot vouch for, the rating waits in the replica's
        outbox and None is returned: it is emitted when the database answers and says the turn is theirs
        (``_replay_rating``). Without an outbox, ``StoreDown`` propagates (a retryable 503)."""
        if (other_turn_id is None) != (value in THUMBS_VALUES):
            raise InputError("Use rating up/down/cleared for one answer, or a/b/tie with other_turn_id.", "rating")
        try:
            return self._rate(user_id, turn_id, value, reason, other_turn_id, consent)
        except StoreDown:
            outbox = self.sessions.outbox
            if outbox is None:
                raise
            args = [user_id, turn_id, value, reason, other_turn_id, consent]
            outbox.put("rating", json.dumps([user_id, turn_id, other_turn_id]), user_id, {"args": args})
            log.warning("sessions store down: %s's rating of %s waits in the outbox", user_id, turn_id)
            return None

    def _replay_rating(self, payload: dict[str, Any], put_at: float) -> str:
        """A rating from the outbox: emitted once its turn is known to be the rater's; kept while it may still be
        on its way from another replica's outbox (``RATING_HOLD_S``), then dropped."""
        user_id, turn_id, value, reason, other_turn_id, consent = payload["args"]
        if self.sessions.deleted_since(user_id, put_at):
            return DROP
        try:
            self._rate(user_id, turn_id, value, reason, other_turn_id, consent)
        except NotYours:
            return DROP if time.time() - put_at > RATING_HOLD_S else LATER
        return DONE

    def _rate(
        self,
        user_id: str,
        turn_id: str,
        value: RatingValue,
        reason: str | None,
        other_turn_id: str | None,
        consent: bool | None,
    ) -> Feedback:
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

    def report(self, user_id: str, turn_id: str, category: ReportCategory, reason: str | None = None) -> UserReport:
        """An end user reports an answer served to them (harmful, wrong, private data leaked): a ``UserReport``
        event, and each ``report_listeners`` callback (the trainers' review queue) gets it with the conversation up
        to that answer when the app kept it (browser chats; API turns are not stored). Raises ``NotYours``."""
        turn = self.sessions.owned_turn(user_id, turn_id)
        if turn is None:
            raise NotYours(NotYours.message)
        report = UserReport(
            user_id=user_id,
            consent=self.sessions.consent(user_id),
            conversation_id=turn.conversation_id,
            turn_id=turn.turn_id,
            model_version=turn.model_version,
            category=category,
            reason=reason,
        )
        self.producer.emit(report)
        msgs = self.sessions.load_conversation(user_id, turn.conversation_id) or []
        at = next((i for i, m in enumerate(msgs) if m.get("turn_id") == turn_id), None)
        context = None
        if at is not None:
            context = ([{"role": m["role"], "content": m["content"]} for m in msgs[:at]], msgs[at]["content"])
        for listener in self.report_listeners:
            try:
                listener(report, context)
            except Exception:  # noqa: BLE001 - the report is recorded; a queue that failed is logged, not the user's problem
                log.exception("a report listener failed for turn %s", turn_id)
        return report

    def set_consent(self, user_id: str, consent: bool) -> None:
        """Event first, local state second: if the event cannot be recorded (``SpoolFull``) the stored consent
        is unchanged, so the next toggle emits again; a change is never lost silently."""
        if self.sessions.stored_consent(user_id) == consent:
            return
        self.producer.emit(
            UserAction(user_id=user_id, consent=consent, action="consent_granted" if consent else "consent_revoked")
        )
        self.sessions.set_consent(user_id, consent)
        if not consent:
            self.withdraw(user_id, deleted=False)

    def withdraw(self, user_id: str, deleted: bool) -> None:
        """Tell each of ``withdrawal_listeners`` (e.g. the trainers' queue) that this user withdrew consent or
        deleted their data; one that fails is logged and the others still run."""
        for forget in self.withdrawal_listeners:
            try:
                forget(user_id, deleted)
            except Exception:  # noqa: BLE001 - the consent change or deletion stands; the failure is on record
                log.exception("a withdrawal listener failed for user %s", user_id)
