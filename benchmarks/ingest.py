"""Producer and ingest throughput, end-to-end latency, and the bare baselines, in one run.

    python -m benchmarks.ingest --events 200000 --json

Starts its own Kafka broker (fresh data dir, free ports) unless ``--bootstrap`` points at one, and writes to
fresh topics and a fresh warehouse. Reported:
- produce_eps: events/s through ``EventProducer.emit`` (durable spool) until the broker acknowledged all.
- ingest_eps: events/s of ``IngestConsumer`` (parse, validate, Arrow, DuckDB commit with offsets).
- raw_consume_eps: a bare kafka-python consume loop over the same topic (no parsing).
- raw_insert_rps: one DuckDB insert of an Arrow table with the same rows.
- e2e_p50_ms / e2e_p99_ms: emit -> row committed in DuckDB (``ingested_at - ts``) at a steady rate
  (default 1,000 events/s), with ingest running as its own process as in production.
Targets (issue 2): ingest_eps >= 0.5 * min(raw_consume_eps, raw_insert_rps); e2e_p99_ms < 1000.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from feedback.events import ChatTurn, Message, Sampling
from feedback.ingest import IngestConsumer
from feedback.producer import EventProducer
from feedback.settings import Settings
from feedback.sink import insert_events
from feedback.topics import ensure_topics
from feedback.warehouse import connect, init_schema
from infra import kafka_local
from infra.ports import free_port as _free_port

REPO = Path(__file__).resolve().parents[1]


def make_events(n: int, seed: int = 0) -> list[ChatTurn]:
    convs = max(1, n // 8)
    return [
        ChatTurn(
            user_id=f"user{i % 997}",
            consent=True,
            conversation_id=f"conv{seed}-{i % convs}",
            turn_id=f"turn{seed}-{i}",
            model_version="base",
            messages=[Message(role="user", content=f"What is {i} plus {i}? Explain briefly.")],
            answer=f"{i} plus {i} is {2 * i}. Adding a number to itself doubles it.",
            sampling=Sampling(temperature=0.7, top_p=0.9, max_new_tokens=128),
            latency_ms=850.0,
            ttft_ms=120.0,
            prompt_tokens=24,
            completion_tokens=18,
        )
        for i in range(n)
    ]


def _env(s: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "FLYWHEEL_HOME": str(s.home),
            "FLYWHEEL_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
            "FLYWHEEL_TOPIC_PREFIX": s.topic_prefix,
            "FLYWHEEL_INGEST_GROUP": s.ingest_group,
            "FLYWHEEL_INGEST_BATCH_MS": str(s.ingest_batch_ms),
            "PYTHONPATH": str(REPO),
        }
    )
    return env


def bench_throughput(s: Settings, n: int, log) -> dict:
    events = make_events(n)
    p = EventProducer(s, spool_name=f"bench-{uuid.uuid4().hex[:6]}")
    t0 = time.perf_counter()
    for e in events:
        p.emit(e)
    t_emit = time.perf_counter() - t0
    assert p.flush(600), f"producer did not drain: {p.pending()} left ({p.stats.last_error})"
    t_prod = time.perf_counter() - t0
    p.close()
    log(f"produced {n} events in {t_prod:.1f}s (emit calls {t_emit:.1f}s)")

    t_start = time.perf_counter()
    stats = IngestConsumer(s).run(max_seconds=900, stop_when=lambda st: st.messages >= n)
    t_end = time.perf_counter()
    t_ingest = t_end - stats.first_data_at  # steady state: the group join is not ingest work
    assert stats.messages >= n, stats.as_dict()
    log(
        f"ingested {stats.messages} events in {t_ingest:.1f}s after a {stats.first_data_at - t_start:.1f}s group join "
        f"({stats.batches} batches)"
    )

    # Baseline 1: a bare kafka-python consume loop over the same data.
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=s.bootstrap_servers, enable_auto_commit=False, group_id=None)
    tps = [TopicPartition(s.topic_turns, p_) for p_ in sorted(c.partitions_for_topic(s.topic_turns))]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    got = 0
    t0 = time.perf_counter()
    while got < n:
        for msgs in c.poll(timeout_ms=500, max_records=5000).values():
            got += len(msgs)
    t_raw_consume = time.perf_counter() - t0
    c.close()
    log(f"raw consume {got} in {t_raw_consume:.1f}s")

    # Baseline 2: one DuckDB insert of an Arrow table with the same rows.
    # (the typed Arrow table is built untimed, by DuckDB in memory, from the same events)
    mem = duckdb.connect()
    init_schema(mem)
    insert_events(mem, events)
    table = mem.sql("SELECT * FROM turns").to_arrow_table()
    mem.close()
    db = Path(tempfile.mkdtemp()) / "raw.duckdb"
    con = duckdb.connect(str(db))
    init_schema(con)
    con.register("_t", table)
    t0 = time.perf_counter()
    con.execute("INSERT INTO turns SELECT * FROM _t").fetchall()
    t_raw_insert = time.perf_counter() - t0
    con.close()
    log(f"raw Arrow insert {n} rows in {t_raw_insert:.2f}s")
    return {
        "events": n,
        "produce_eps": round(n / t_prod),
        "emit_call_eps": round(n / t_emit),
        "ingest_eps": round(n / t_ingest),
        "ingest_group_join_s": round(stats.first_data_at - t_start, 2),
        "raw_consume_eps": round(got / t_raw_consume),
        "raw_insert_rps": round(n / t_raw_insert),
    }


def bench_latency(s: Settings, rate: int, seconds: float, log) -> dict:
    proc = subprocess.Popen(
        [sys.executable, "-m", "feedback.ingest"],
        cwd=REPO,
        env=_env(s),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Warm up: wait until the consumer is assigned and committing.
        p = EventProducer(s, spool_name=f"lat-{uuid.uuid4().hex[:6]}")
        warm = make_events(10, seed=1)
        for e in warm:
            p.emit(e)
        p.flush(30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not s.warehouse_path.exists():
                time.sleep(0.2)
                continue
            with connect(s.warehouse_path, read_only=True) as con:
                if con.execute("SELECT count(*) FROM turns WHERE turn_id LIKE 'turn1-%'").fetchall()[0][0] >= 10:
                    break
            time.sleep(0.2)
        n = int(rate * seconds)
        events = make_events(n, seed=2)
        t0 = time.perf_counter()
        for i in range(n):
            target = t0 + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            # stamp at emit time: ts is what the latency is measured from
            p.emit(events[i].model_copy(update={"ts": datetime.now(UTC)}))
        p.flush(60)
        p.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with connect(s.warehouse_path, read_only=True) as con:
                rows = con.execute(
                    "SELECT quantile_cont(epoch_ms(ingested_at) - epoch_ms(ts), [0.5, 0.99]), count(*) "
                    "FROM turns WHERE turn_id LIKE 'turn2-%'"
                ).fetchall()[0]
            if rows[1] >= n:
                break
            time.sleep(0.5)
        p50, p99 = rows[0]
        log(f"e2e at {rate}/s for {seconds:.0f}s: p50 {p50:.0f} ms, p99 {p99:.0f} ms ({rows[1]} rows)")
        return {"e2e_rate_eps": rate, "e2e_events": n, "e2e_p50_ms": round(p50, 1), "e2e_p99_ms": round(p99, 1)}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--rate", type=int, default=1000, help="events/s for the latency phase")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the latency phase")
    ap.add_argument("--bootstrap", default=None, help="use this broker instead of starting one")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print

    home = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    tag = uuid.uuid4().hex[:8]
    own = args.bootstrap is None
    s = Settings(
        home=home,
        kafka_bootstrap=args.bootstrap or f"127.0.0.1:{_free_port()}",
        kafka_controller_port=_free_port(),
        topic_prefix=f"bench{tag}",
        ingest_group=f"bench-{tag}",
        ingest_batch_ms=100,
    )
    if own:
        kafka_local.start(s, quiet=True)
        log(f"broker on {s.kafka_bootstrap}")
    try:
        ensure_topics(s)
        result = bench_throughput(s, args.events, log)
        s_lat = Settings(
            **{**s.model_dump(), "ingest_group": f"lat-{tag}", "topic_prefix": f"lat{tag}", "home": home / "lat"}
        )
        ensure_topics(s_lat)
        result.update(bench_latency(s_lat, args.rate, args.seconds, log))
    finally:
        if own:
            kafka_local.stop(s)
    floor = min(result["raw_consume_eps"], result["raw_insert_rps"])
    result["targets"] = {
        "ingest_eps_vs_half_min_baseline": round(result["ingest_eps"] / (0.5 * floor), 2),
        "ingest_eps_ok": result["ingest_eps"] >= 0.5 * floor,
        "e2e_p99_ok": result["e2e_p99_ms"] < 1000,
    }
    result["machine"] = {"cpus": os.cpu_count()}
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
