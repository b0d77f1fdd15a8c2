"""Exactly-once ingest: Kafka -> DuckDB with the consumer's offsets stored in the same transaction as the rows.

    flywheel ingest                 # the continuous consumer (``make run`` starts it)

Why exactly once: a batch's rows and the next offsets of every partition it read are committed in one DuckDB
transaction (``feedback.sink.commit_batch``). On start and on every rebalance the consumer seeks to the offsets
stored in DuckDB, not to Kafka's committed offsets, so a crash at any point either kept the whole batch and
its offsets or neither. Duplicates that the producer re-sent after a crash carry the same ``event_id`` and are
dropped by the primary key. Kafka's group offsets are also committed (after DuckDB) only so that lag tools work.

Bad messages (not JSON, failing the schema, over ``max_event_bytes``) go to the DLQ topic with the reason and
the original bytes (headers carry reason, detail and source position) and to the ``dead_letters`` table; the
DLQ produce is flushed before the batch commits, so no bad message is lost (a crash may repeat one in the DLQ;
its key ``topic:partition:offset`` identifies repeats). Each DLQ send is confirmed (its future resolved) before
the batch that produced it commits; a failed DLQ send fails the commit, so the batch is read again.

Sealed values (``feedback.shred``) are opened with the user's key first. A value whose key was destroyed by a
deletion request is dropped and counted (``shredded``); one whose key is unknown goes to the DLQ
(``undecryptable``). A reader holding the warehouse past the writer's patience makes the commit wait and retry
(the batch stays in memory, later events wait in Kafka), never drop.

The consumer keeps the DuckDB file open while busy and hands it to readers in other processes between batches
(``feedback.warehouse.WriterSession``).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from feedback.events import EventError, parse_event
from feedback.settings import Settings, get_settings
from feedback.shred import SHREDDED, KeyStore
from feedback.sink import Batch, commit_batch
from feedback.warehouse import WarehouseBusy, WriterSession, connect, init_schema, stored_offsets

log = logging.getLogger(__name__)


@dataclass
class IngestStats:
    batches: int = 0
    messages: int = 0
    inserted: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    duplicates: int = 0
    shredded: int = 0
    busy_retries: int = 0
    last_commit_at: float | None = None
    first_data_at: float | None = None  # perf_counter() when the first records arrived (after the group join)

    def as_dict(self) -> dict:
        return {
            "batches": self.batches,
            "messages": self.messages,
            "inserted": dict(self.inserted),
            "dead_letters": self.dead_letters,
            "duplicates": self.duplicates,
            "shredded": self.shredded,
            "busy_retries": self.busy_retries,
        }


def _rejoin_if_stranded(consumer: KafkaConsumer) -> bool:
    """Ask the group again when kafka-python 3.0.12 has dropped a finished join.

    A rebalance that the metadata started (the first join of a fresh group lands before the topics' metadata, so
    a second one follows) runs as a task across polls. When the poll that started it times out, the next poll
    sees the metadata and the assignment agree, so it never collects the task's result: the member keeps no
    partitions, its heartbeat stays off, and the broker drops it; ingest would sit idle forever. The pinned
    version is the one this reads (``_coordinator``, ``_join_task``): a new version must pass
    ``tests/feedback/test_ingest.py::test_a_join_that_outlives_a_short_poll_still_gets_its_partitions``.
    """
    coordinator = consumer._coordinator
    task = getattr(coordinator, "_join_task", None)
    if task is None or not task.is_done or coordinator.need_rejoin():
        return False
    log.warning("the group join finished unseen (kafka-python 3.0 join task); rejoining")
    coordinator._join_task = None
    coordinator.request_rejoin()
    return True


class _SeekToWarehouse(ConsumerRebalanceListener):
    def __init__(self, ingest: IngestConsumer):
        self.ingest = ingest

    def on_partitions_revoked(self, revoked):
        # Commit what we have for partitions we still own; anything uncommitted is re-read by the next owner.
        try:
            self.ingest.flush(wait=True)
        except Exception:  # noqa: BLE001
            log.exception("flush on revoke failed; the batch will be re-read by the next owner")
            self.ingest.batch = Batch()

    def on_partitions_assigned(self, assigned):
        self.ingest.seek_to_stored(assigned)


class IngestConsumer:
    def __init__(self, settings: Settings | None = None, group: str | None = None, **consumer_overrides):
        self.s = settings or get_settings()
        self.group = group or self.s.ingest_group
        self.topics = [self.s.topic_turns, self.s.topic_feedback]
        self.stats = IngestStats()
        self.batch = Batch()
        self._batch_started: float | None = None
        self._stop = threading.Event()
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="flywheel-commit")
        self._inflight: Future | None = None
        self._kafka_offsets: dict[tuple[str, int], int] = {}
        self.writer = WriterSession(self.s.warehouse_path, timeout_s=self.s.warehouse_lock_timeout_s)
        self.keys = KeyStore(self.s)
        init_schema(self.writer.connection())
        config = dict(
            bootstrap_servers=self.s.bootstrap_servers,
            group_id=self.group,
            client_id=f"flywheel-ingest-{self.group}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.s.ingest_batch_max,
            session_timeout_ms=self.s.ingest_session_timeout_ms,
            heartbeat_interval_ms=1_000,
            max_poll_interval_ms=300_000,
            fetch_max_wait_ms=50,
        )
        config.update(consumer_overrides)
        self.consumer = KafkaConsumer(**config)
        self.consumer.subscribe(self.topics, listener=_SeekToWarehouse(self))
        self._dlq: KafkaProducer | None = None

    # ---- offsets --------------------------------------------------------------------------------------
    def seek_to_stored(self, partitions) -> None:
        self.wait_committed()
        stored = stored_offsets(self.writer.connection(), self.group)
        for tp in partitions:
            off = stored.get((tp.topic, tp.partition))
            if off is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, off)
        log.info("assigned %s; positions from the warehouse", sorted((tp.topic, tp.partition) for tp in partitions))

    # ---- the loop -------------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(
        self,
        idle_exit_s: float | None = None,
        max_seconds: float | None = None,
        stop_when: Callable[[IngestStats], bool] | None = None,
    ) -> IngestStats:
        """Consume until stopped, or idle for ``idle_exit_s`` with nothing pending, or ``max_seconds``, or
        ``stop_when(stats)`` is true after a commit (tests and benchmarks)."""
        started = time.monotonic()
        last_data = time.monotonic()
        try:
            while not self._stop.is_set():
                wait_ms = self.s.ingest_batch_ms
                if self._batch_started is not None:
                    wait_ms = max(0, int(self.s.ingest_batch_ms - (time.monotonic() - self._batch_started) * 1000))
                try:
                    records = self.consumer.poll(timeout_ms=wait_ms, max_records=self.s.ingest_batch_max)
                except KafkaError as e:
                    # kafka-python 3.0 raises a broker outage out of poll (ECONNREFUSED while finding the
                    # coordinator); the outage ends, this process must not. The batch stays in memory.
                    if not e.retriable:
                        raise
                    log.warning("broker unreachable (%s); retrying in 1 s", e)
                    self._stop.wait(1.0)
                    records = {}
                _rejoin_if_stranded(self.consumer)
                if records:
                    last_data = time.monotonic()
                    if self.stats.first_data_at is None:
                        self.stats.first_data_at = time.perf_counter()
                    self._add(records)
                due = self._batch_started is not None and (
                    self.batch.messages >= self.s.ingest_batch_max
                    or (time.monotonic() - self._batch_started) * 1000 >= self.s.ingest_batch_ms
                )
                if due:
                    self.flush()
                elif self._inflight is not None and self._inflight.done():
                    self.wait_committed()
                elif self._inflight is None and self.batch.messages == 0:
                    self._committer.submit(self.writer.maybe_yield).result()  # idle: readers get the file
                if stop_when is not None and stop_when(self.stats):
                    break
                now = time.monotonic()
                if not self.consumer.assignment():
                    last_data = now  # still joining the group: not idle yet
                if idle_exit_s is not None and self.batch.messages == 0 and now - last_data > idle_exit_s:
                    break
                if max_seconds is not None and now - started > max_seconds:
                    break
            self.flush(wait=True)
        finally:
            self.close()
        return self.stats

    def _add(self, records) -> None:
        if self._batch_started is None:
            self._batch_started = time.monotonic()
        msgs = [(tp, m) for tp, ms in records.items() for m in ms]
        opened = self.keys.open_many([m.value if m.value is not None else b"" for _, m in msgs])
        for (tp, m), plain in zip(msgs, opened, strict=True):
            raw = m.value if m.value is not None else b""
            try:
                if plain is SHREDDED:
                    self.stats.shredded += 1  # its user was deleted: nothing to keep
                elif plain is None:
                    raise EventError("undecryptable", "sealed with a key this machine does not hold")
                else:
                    self.batch.add_event(parse_event(plain, max_bytes=self.s.max_event_bytes), tp.partition, m.offset)
            except EventError as e:
                self.batch.add_dead_letter(tp.topic, tp.partition, m.offset, e.reason, e.detail, raw)
                self._to_dlq(tp, m, e)
            self.batch.advance(tp.topic, tp.partition, m.offset)

    def _to_dlq(self, tp, m, e: EventError) -> None:
        if self._dlq is None:
            self._dlq = KafkaProducer(
                bootstrap_servers=self.s.bootstrap_servers,
                acks="all",
                enable_idempotence=True,
                client_id="flywheel-dlq",
                max_request_size=max(2 * 1024 * 1024, 4 * self.s.max_event_bytes),
            )
        headers = [
            ("reason", e.reason.encode()),
            ("detail", e.detail.encode()[:4000]),
            ("source_topic", tp.topic.encode()),
            ("source_partition", str(tp.partition).encode()),
            ("source_offset", str(m.offset).encode()),
        ]
        fut = self._dlq.send(
            self.s.topic_dlq,
            key=f"{tp.topic}:{tp.partition}:{m.offset}".encode(),
            value=m.value or b"",
            headers=headers,
        )
        self.batch.dlq_sends.append(fut)

    def flush(self, wait: bool = False) -> None:
        """Hand the pending batch to the commit thread (at most one batch in flight) and start a new one.

        The commit thread sends DLQ records first, then writes rows + offsets in one DuckDB transaction; DuckDB
        works without the GIL, so the next batch is polled and validated meanwhile. ``wait=True`` returns only
        when everything handed over is committed (shutdown, rebalance)."""
        if self.batch.messages:
            self.wait_committed()  # one in flight: bounded memory, and batches commit in order
            batch, self.batch, self._batch_started = self.batch, Batch(), None
            self._inflight = self._committer.submit(self._commit, batch)
        else:
            self._batch_started = None
        if wait:
            self.wait_committed()

    def wait_committed(self) -> None:
        if self._inflight is not None:
            fut, self._inflight = self._inflight, None
            fut.result()  # re-raises a failed commit: the batch is not stored, its offsets neither
        self._commit_kafka_offsets()

    def _commit(self, batch: Batch) -> None:
        """Commit thread: DLQ first, then the batch, then hand the file to readers if one waits."""
        if batch.dlq_sends:
            self._dlq.flush(timeout=30)
            for fut in batch.dlq_sends:
                fut.get(timeout=30)  # raises if the broker did not take it: the batch must not commit
        inserted = self._commit_rows(batch)
        st = self.stats
        st.batches += 1
        st.messages += batch.messages
        for t, n in inserted.items():
            st.inserted[t] = st.inserted.get(t, 0) + n
        st.dead_letters += inserted.get("dead_letters", 0)
        st.duplicates += batch.duplicates + batch.events - sum(n for t, n in inserted.items() if t != "dead_letters")
        st.last_commit_at = time.time()
        self._kafka_offsets.update(batch.offsets)
        self.writer.maybe_yield()

    def _commit_rows(self, batch: Batch) -> dict[str, int]:
        """Rows and offsets in one transaction, waiting (not failing) while a reader holds the file too long."""
        while True:
            try:
                return commit_batch(self.writer.connection(), batch, self.group)
            except WarehouseBusy as e:
                if self._stop.is_set():
                    raise
                self.stats.busy_retries += 1
                log.warning("warehouse busy (%s); the batch waits and retries", e)

    def _commit_kafka_offsets(self) -> None:
        """Informational only (lag tools): the warehouse is the source of truth for positions."""
        if not self._kafka_offsets:
            return
        offsets, self._kafka_offsets = self._kafka_offsets, {}
        try:
            self.consumer.commit_async(
                {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
            )
        except Exception:  # noqa: BLE001
            log.debug("kafka offset commit failed (informational)", exc_info=True)

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        finally:
            self._committer.shutdown(wait=True)
            self.writer.close()
            self.keys.close()
            if self._dlq is not None:
                self._dlq.close(timeout=10)


def lag(s: Settings, group: str | None = None) -> dict[str, dict]:
    """Per-topic end offsets vs. the offsets stored in the warehouse (the truth for this sink)."""
    group = group or s.ingest_group
    consumer = KafkaConsumer(
        bootstrap_servers=s.bootstrap_servers, client_id="flywheel-status", request_timeout_ms=5000
    )
    try:
        tps = []
        for topic in (s.topic_turns, s.topic_feedback, s.topic_dlq, s.topic_releases):
            parts = consumer.partitions_for_topic(topic) or set()
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        ends = consumer.end_offsets(tps) if tps else {}
        begins = consumer.beginning_offsets(tps) if tps else {}
    finally:
        consumer.close()
    stored: dict[tuple[str, int], int] = {}
    if s.warehouse_path.exists():
        with connect(s.warehouse_path, read_only=True, timeout_s=10) as con:
            stored = stored_offsets(con, group)
    out: dict[str, dict] = {}
    for tp in tps:
        t = out.setdefault(tp.topic, {"partitions": 0, "messages": 0, "lag": None})
        t["partitions"] += 1
        t["messages"] += ends[tp] - begins[tp]
        if tp.topic in (s.topic_turns, s.topic_feedback):
            pos = stored.get((tp.topic, tp.partition), begins[tp])
            t["lag"] = (t["lag"] or 0) + max(0, ends[tp] - pos)
    return out


def main(settings: Settings | None = None) -> None:
    """Run the continuous consumer until SIGINT/SIGTERM, logging progress every 10 s."""
    s = settings or get_settings()
    ingest = IngestConsumer(s)
    signal.signal(signal.SIGTERM, lambda *_: ingest.stop())
    signal.signal(signal.SIGINT, lambda *_: ingest.stop())

    def report():
        last = 0
        while not ingest._stop.wait(10):
            st = ingest.stats
            log.info(
                "ingest: %d messages (+%d), rows %s, dead letters %d, duplicates dropped %d",
                st.messages,
                st.messages - last,
                st.inserted,
                st.dead_letters,
                st.duplicates,
            )
            last = st.messages

    threading.Thread(target=report, daemon=True).start()
    log.info("ingest: consuming %s into %s (group %s)", ingest.topics, s.warehouse_path, ingest.group)
    ingest.run()
    log.info("ingest: stopped cleanly: %s", ingest.stats.as_dict())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    main()
