"""The producer that loses nothing: outbox first, then Kafka with ``acks=all`` and idempotence.

``emit()`` appends the event to the durable local spool and returns (tens of microseconds; it never waits for
the broker). A background thread sends the spool in order, keyed by conversation so each conversation stays
ordered in its partition, and removes rows only once the broker acknowledged them. While the broker is down
the spool grows on disk; a restarted process finds it and sends it. A crash between the broker's ack and the
spool delete re-sends a few events: they carry the same ``event_id`` and the ingest sink drops them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from kafka import KafkaProducer

from feedback.events import ChatTurn, Feedback, UserAction, partition_key, to_bytes
from feedback.settings import Settings, get_settings
from feedback.spool import Spool

log = logging.getLogger(__name__)


@dataclass
class ProducerStats:
    sent: int = 0
    send_failures: int = 0
    broker_up: bool = False
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
        self.spool = Spool(self.settings.spool_path, spool_name or f"producer-{os.getpid()}")
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
    def topic_for(self, event: ChatTurn | Feedback | UserAction) -> str:
        return self.settings.topic_turns if isinstance(event, ChatTurn) else self.settings.topic_feedback

    def emit(self, event: ChatTurn | Feedback | UserAction) -> None:
        """Durably queue one event for Kafka. Returns once it is on local disk."""
        self.spool.append(self.topic_for(event), partition_key(event), to_bytes(event))
        self._wake.set()

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
            rows = self.spool.peek(self._batch)
            if not rows:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                producer = self._get_producer()
                futures = [(rid, producer.send(topic, key=key, value=value)) for rid, topic, key, value in rows]
                producer.flush(timeout=10)
                acked = None
                for rid, fut in futures:
                    if not fut.is_done or fut.failed():
                        break
                    acked = rid
                if acked is not None:
                    self.spool.ack_through(acked)
                    self.stats.sent += sum(1 for rid, _ in futures if rid <= acked)
                if acked != rows[-1][0]:
                    failed = next((f for _, f in futures if f.is_done and f.failed()), None)
                    why = failed.exception if failed else "timeout"
                    raise RuntimeError(f"broker did not acknowledge all sends: {why}")
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
