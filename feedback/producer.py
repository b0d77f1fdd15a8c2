"""The producer that loses nothing: outbox first, then Kafka with ``acks=all`` and idempotence.

``emit()`` appends the event to the durable local spool and returns (tens of microseconds; it never waits for
the broker). A background thread sends the spool in order, keyed by conversation so each conversation stays
ordered in its partition, and removes rows only once the broker acknowledged them. While the broker is down
the spool grows on disk; a restarted process finds it and sends it. A crash between the broker's ack and the
spool delete re-sends a few events: they carry the same ``event_id`` and the ingest sink drops them.

Turns and ratings are sealed with the user's payload key before they reach the outbox (``feedback.shred``), so a
deletion makes every copy unreadable. ``emit()`` raises ``SpoolFull`` when the outbox cannot take the event (disk
full, size bound reached): the caller must refuse the request, since the event is not recorded. A record the
broker refuses for good (too large, invalid topic) is moved to the spool's ``rejected.log`` instead of blocking
everything behind it; ``stats.rejected`` counts them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from kafka import KafkaProducer
from kafka.errors import (
    CorruptRecordError,
    InvalidRecordError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)

from feedback.events import AnyEvent, ChatTurn, UserAction, partition_key, sealing_user, to_bytes
from feedback.settings import Settings, get_settings
from feedback.shred import KeyStore
from feedback.spool import Spool, SpoolFull

__all__ = ["EventProducer", "ProducerStats", "SpoolFull"]

log = logging.getLogger(__name__)


@dataclass
class ProducerStats:
    sent: int = 0
    send_failures: int = 0
    broker_up: bool = False
    rejected: int = 0
    last_error: str | None = None
    last_error_at: float | None = field(default=None, repr=False)


class EventProducer:
    """Thread-safe; one per process (per spool name)."""

    def __init__(
        self,
        settings: Settings | None = None,
        spool_name: str | None = None,
        batch: int = 2000,
        **kafka_overrides,
    ):
        self.settings = settings or get_settings()
        s = self.settings
        self.spool = Spool(
            s.spool_path,
            spool_name or f"producer-{os.getpid()}",
            max_bytes=s.spool_max_bytes,
            fsync=s.spool_fsync,
            fsync_interval_s=s.spool_fsync_interval_ms / 1000,
        )
        self.keys = KeyStore(s) if s.payload_encryption else None
        self.stats = ProducerStats()
        self._batch = batch
        self._kafka_config = dict(
            bootstrap_servers=self.settings.bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            linger_ms=self.settings.producer_linger_ms,
            max_block_ms=5_000,
            request_timeout_ms=5_000,
            delivery_timeout_ms=15_000,
            reconnect_backoff_max_ms=1_000,
            client_id="flywheel-producer",
        )
        self._kafka_config.update(kafka_overrides)
        self._producer: KafkaProducer | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flywheel-producer", daemon=True)
        self._thread.start()

    # ---- caller side -------------------------------------------------------------------------------
    def topic_for(self, event: AnyEvent) -> str:
        return self.settings.topic_turns if isinstance(event, ChatTurn) else self.settings.topic_feedback

    def emit(self, event: AnyEvent) -> None:
        """Durably queue one event for Kafka. Returns once it is in the outbox; raises ``SpoolFull`` if it is not."""
        self.spool.append(self.topic_for(event), partition_key(event), self.encode(event))
        self._wake.set()

    def encode(self, event: AnyEvent) -> bytes:
        """The value on the wire: every event with text sealed with its user's key (``sealing_user``: a trainer's
        judgment of an end user's conversation with the end user's); user actions in clear."""
        raw = to_bytes(event)
        if self.keys is not None and not isinstance(event, UserAction):
            return self.keys.seal(sealing_user(event), raw)
        return raw

    def emit_raw(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Queue bytes as they are (tests and replays: the DLQ path must see what a client really sent)."""
        self.spool.append(topic, key, value)
        self._wake.set()

    def pending(self) -> int:
        return len(self.spool)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every emitted event is acknowledged by the broker; False on timeout."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while time.monotonic() < deadline:
            if len(self.spool) == 0:
                return True
            self._wake.set()
            time.sleep(0.01)
        return len(self.spool) == 0

    def close(self, timeout: float = 10.0) -> None:
        """Send what can be sent within ``timeout``; the rest stays in the spool for the next start."""
        self.flush(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self._drop_producer()
        self.spool.close()
        if self.keys is not None:
            self.keys.close()

    # ---- sender thread -----------------------------------------------------------------------------
    def _get_producer(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = KafkaProducer(**self._kafka_config)
        return self._producer

    def _drop_producer(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=0)
            except Exception:  # noqa: BLE001 - already failing; we only release sockets
                pass
            self._producer = None

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            self.spool.sync()
            rows = self.spool.peek(self._batch)
            if not rows:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self._send(rows)
                self.stats.broker_up = True
                backoff = 0.1
            except Exception as e:  # noqa: BLE001 - any failure: keep the spool, reconnect, retry
                self.stats.send_failures += 1
                self.stats.broker_up = False
                self.stats.last_error = f"{type(e).__name__}: {e}"
                self.stats.last_error_at = time.time()
                log.warning("Kafka send failed (%s); %d events kept in the spool, retrying", e, len(self.spool))
                self._drop_producer()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    def _send(self, rows: list[tuple[int, str, bytes | None, bytes]]) -> None:
        """Send one batch in order; acknowledge the longest acknowledged prefix; set aside a head record the
        broker refuses for good; raise for anything retriable (the caller backs off and retries)."""
        producer = self._get_producer()
        futures = []
        for rid, topic, key, value in rows:
            try:
                futures.append((rid, producer.send(topic, key=key, value=value)))
            except KafkaError as e:  # raised before sending: too large for the client, no metadata ...
                futures.append((rid, e))
                break
        producer.flush(timeout=10)
        acked = None
        failure: BaseException | None = None
        for rid, fut in futures:
            if isinstance(fut, BaseException):
                failure = fut
                break
            if not fut.is_done:
                break
            if fut.failed():
                failure = fut.exception
                break
            acked = rid
        if acked is not None:
            self.spool.ack_through(acked)
            self.stats.sent += sum(1 for rid, _ in futures if rid <= acked)
        if acked == rows[-1][0]:
            return
        head = next(r for r in rows if acked is None or r[0] > acked)
        if failure is not None and _refused_for_good(failure):
            self.spool.reject(head[0], head[1], head[2], head[3], f"{type(failure).__name__}: {failure}")
            self.stats.rejected += 1
            return
        raise RuntimeError(f"broker did not acknowledge all sends: {failure or 'timeout'}")


def _refused_for_good(e: BaseException) -> bool:
    """Errors about the record itself, which no retry can fix (everything else, e.g. a broker outage or missing
    replicas, is retried until the broker takes the record)."""
    return isinstance(e, _POISON)


_POISON = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidTopicError, CorruptRecordError, InvalidRecordError)
