"""The fault campaign: simulated users chat and rate through the public API while faults hit the stack at random
moments; afterwards every acknowledged event is looked up in the warehouse.

    python -m benchmarks.faults --json                      # one broker, every fault
    python -m benchmarks.faults --brokers 3 --json          # a local 3-broker cluster (RF 3, min ISR 2)
    python -m benchmarks.faults --faults ingest_kill,broker_outage --seconds 30   # a reduced form
    python -m benchmarks.faults --faults suite --no-prefect --seconds 3 --users 1 --outage-s 2   # the suite's slice

It starts its own world (fresh FLYWHEEL_HOME, free ports): the Kafka broker(s), ``feedback.ingest`` and
``app.server`` (the real model) as processes, a producer process of its own, and (with ``--prefect``) the Prefect
server. The outboxes (``FLYWHEEL_SPOOL_DIR``) live on a 4 MiB tmpfs mounted for the run (root only; otherwise a
directory bounded by ``FLYWHEEL_SPOOL_MAX_BYTES``; the result says which).

Faults (each once, in random order, at random moments, while users keep going):
- ``app_kill``, ``ingest_kill``, ``producer_kill``: SIGKILL of the process, restarted at once (as ``flywheel up``
  would);
- ``broker_kill`` (``--brokers 3`` only): SIGKILL of one broker of three, restarted after a few seconds;
- ``broker_outage``: every broker stopped for ``--outage-s`` seconds;
- ``reader_holds``: a reader holds DuckDB past the writer's patience (``FLYWHEEL_WAREHOUSE_LOCK_TIMEOUT_S`` is 3 s
  here; the reader holds 6 s);
- ``prefect_down`` (``--prefect``): the Prefect server is killed, then ``flywheel run volume-trigger`` runs;
- ``disk_full``: the filesystem under the outboxes is filled; requests get 503 (not acknowledged), then the
  space comes back.

An event is *acknowledged* when the client was told it was recorded: a 200 chat completion (its turn), a 200
rating (its event id), an event id the producer process printed after ``emit()`` returned. Afterwards the
outboxes drain, ingest catches up, and: ``lost`` = acknowledged ids missing from the warehouse, ``duplicated`` =
ids stored more than once (a turn by ``turn_id``, so a re-emitted turn with a new event id counts too).
``recovery_s`` of a fault: from clearing it (restart, broker back, reader gone, space back) until a fresh probe
request is answered and its turn is in the warehouse. Targets: lost 0, duplicated 0.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from feedback.events import ChatTurn, Message
from feedback.settings import Settings
from feedback.warehouse import WarehouseBusy, connect
from infra import kafka_local
from infra.ports import free_port as _free_port

REPO = Path(__file__).resolve().parents[1]
ALL_FAULTS = (
    "app_kill",
    "ingest_kill",
    "producer_kill",
    "broker_kill",
    "broker_outage",
    "reader_holds",
    "prefect_down",
    "disk_full",
)
# The suite's slice (tests/feedback/test_faults_campaign.py): the faults whose campaign runs found bugs that were
# fixed, so each of those cases runs on every change. The other faults have tests of their own (SIGKILL
# exactly-once, reader/writer turns, a spool that survives a crash, a broker of three SIGKILLed) or none to guard.
SUITE_FAULTS = {
    "broker_outage": "ee1b978: ingest ended on ECONNREFUSED raised out of poll during an outage (never recovered)",
    "ingest_kill": "87bbd32: an ingest restarted while the broker was away hung on a metadata call without timeout",
    "disk_full": "5d0bdc4: a turn whose event the full outbox could not take was answered as recorded (now 503)",
}
ADMIN = "faults-admin-token"
PATIENCE_S = 3.0


def _free_block(n: int) -> int:
    """A first port with the next ``2n`` free too (a local cluster takes consecutive ports)."""
    import socket

    while True:
        base = _free_port()
        try:
            socks = []
            for p in range(base, base + 2 * n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


# ---- the world ------------------------------------------------------------------------------------------
@dataclass
class World:
    home: Path
    settings: Settings
    env: dict[str, str]
    brokers: int
    spool_dir: Path
    spool_kind: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    producer_log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.app_port}"

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        p = subprocess.Popen(argv, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def start_app(self) -> None:
        self.spawn("app", [sys.executable, "-m", "app.server"])

    def start_ingest(self) -> None:
        self.spawn("ingest", [sys.executable, "-m", "feedback.ingest"])

    def start_producer(self) -> None:
        assert self.producer_log is not None
        log = open(self.producer_log, "ab")  # noqa: SIM115 - owned by the child
        self.procs["producer"] = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.faults", "--producer-child"],
            env=self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def kill(self, name: str) -> None:
        p = self.procs.get(name)
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)

    def stop(self, name: str, timeout: float = 15.0) -> None:
        p = self.procs.get(name)
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)

    def kafka_start(self) -> None:
        if self.brokers == 1:
            kafka_local.start(self.settings, quiet=True)
        else:
            kafka_local.start_cluster(self.settings, self.brokers, quiet=True)

    def kafka_stop(self, kill: bool = False) -> None:
        if self.brokers == 1:
            kafka_local.stop(self.settings, kill=kill)
        else:
            kafka_local.stop_cluster(self.settings, kill=kill)

    def app_ready(self, timeout: float = 300.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the app did not answer within {timeout:.0f}s; see {self.home / 'app.log'}")


def make_world(brokers: int, prefect: bool) -> World:
    home = Path(tempfile.mkdtemp(prefix="flywheel-faults-"))
    spool_dir = home / "spool-fs"
    spool_dir.mkdir()
    spool_kind = "tmpfs 4 MiB"
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(spool_dir)], capture_output=True
        ).returncode
        != 0
    ):
        spool_kind = "size-limited directory (FLYWHEEL_SPOOL_MAX_BYTES=4 MiB): mounting a tmpfs was refused"
    base = _free_block(brokers)
    s = Settings(
        home=home / "home",
        kafka_bootstrap=f"127.0.0.1:{base}",
        kafka_controller_port=base + 1,
        kafka_heap="512m",
        app_port=_free_port(),
        prefect_port=_free_port(),
        topic_prefix="faults",
        ingest_batch_ms=100,
        ingest_session_timeout_ms=6000,
        spool_dir=spool_dir,
        spool_max_bytes=4 * 1024 * 1024,
        warehouse_lock_timeout_s=PATIENCE_S,
    )
    if brokers > 1:
        s = kafka_local.cluster_settings(s, kafka_local.cluster_nodes(s, brokers))
    s.home.mkdir(parents=True)
    env = dict(os.environ)
    env.update(
        {
            "FLYWHEEL_HOME": str(s.home),
            "FLYWHEEL_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
            "FLYWHEEL_KAFKA_CONTROLLER_PORT": str(s.kafka_controller_port),
            "FLYWHEEL_KAFKA_REPLICATION": str(s.kafka_replication),
            "FLYWHEEL_KAFKA_MIN_INSYNC": str(s.kafka_min_insync),
            "FLYWHEEL_TOPIC_PREFIX": s.topic_prefix,
            "FLYWHEEL_APP_PORT": str(s.app_port),
            "FLYWHEEL_PREFECT_PORT": str(s.prefect_port),
            "FLYWHEEL_INGEST_BATCH_MS": "100",
            "FLYWHEEL_INGEST_SESSION_TIMEOUT_MS": "6000",
            "FLYWHEEL_SPOOL_DIR": str(spool_dir),
            "FLYWHEEL_SPOOL_MAX_BYTES": str(4 * 1024 * 1024),
            "FLYWHEEL_WAREHOUSE_LOCK_TIMEOUT_S": str(PATIENCE_S),
            "FLYWHEEL_ADMIN_TOKEN": ADMIN,
            "FLYWHEEL_APP_MAX_NEW_TOKENS": "4",
            "PYTHONPATH": str(REPO),
            "FLYWHEEL_BASE_MODEL": os.environ.get("FLYWHEEL_BASE_MODEL", str(REPO / ".flywheel" / "models" / "base")),
        }
    )
    w = World(home=home, settings=s, env=env, brokers=brokers, spool_dir=spool_dir, spool_kind=spool_kind)
    w.producer_log = home / "producer.ids"
    return w


def teardown(w: World, prefect: bool) -> None:
    for name in list(w.procs):
        w.stop(name, timeout=10)
    if prefect:
        from infra import prefect_server

        prefect_server.stop(w.settings, timeout_s=5)
    kafka_local.stop_all(w.settings, timeout_s=10)
    subprocess.run(["umount", str(w.spool_dir)], capture_output=True)


# ---- users ----------------------------------------------------------------------------------------------
@dataclass
class Ledger:
    turns: set[str] = field(default_factory=set)
    ratings: set[str] = field(default_factory=set)
    refused: int = 0
    errors_5xx: dict[int, int] = field(default_factory=dict)
    mu: threading.Lock = field(default_factory=threading.Lock)


def user_loop(w: World, name: str, ledger: Ledger, stop: threading.Event, rng: random.Random) -> None:
    client = httpx.Client(timeout=60)
    n = 0
    while not stop.is_set():
        n += 1
        try:
            r = client.post(
                f"{w.url}/v1/chat/completions",
                headers={"X-Flywheel-Consent": "1"},
                json={
                    "model": "flywheel",
                    "user": name,
                    "max_tokens": 2,
                    "messages": [{"role": "user", "content": f"{name} question {n}: name a colour"}],
                },
            )
        except httpx.HTTPError:
            ledger.refused += 1
            stop.wait(0.5)
            continue
        if r.status_code != 200:
            with ledger.mu:
                ledger.refused += 1
                if r.status_code >= 500:
                    ledger.errors_5xx[r.status_code] = ledger.errors_5xx.get(r.status_code, 0) + 1
            stop.wait(0.3)
            continue
        turn_id = r.json()["id"].removeprefix("chatcmpl-")
        with ledger.mu:
            ledger.turns.add(turn_id)
        if rng.random() < 0.5:
            try:
                f = client.post(
                    f"{w.url}/v1/feedback",
                    json={"turn_id": turn_id, "user": name, "rating": rng.choice(["up", "down"])},
                )
            except httpx.HTTPError:
                continue
            if f.status_code == 200:
                with ledger.mu:
                    ledger.ratings.add(f.json()["event_id"])
            else:
                ledger.refused += 1


def producer_child() -> None:
    """A producer process of its own: emits turns and prints each event's turn id once ``emit()`` returned."""
    from feedback.producer import EventProducer
    from feedback.settings import get_settings

    p = EventProducer(get_settings(), spool_name="faults-producer")
    signal.signal(signal.SIGTERM, lambda *_: (p.close(timeout=30), sys.exit(0)))
    while True:
        tid = f"p-{uuid.uuid4().hex}"
        try:
            p.emit(
                ChatTurn(
                    user_id="producer",
                    consent=True,
                    conversation_id="p-conv",
                    turn_id=tid,
                    model_version="base",
                    messages=[Message(role="user", content="q")],
                    answer="a",
                    latency_ms=1.0,
                )
            )
        except OSError:  # outbox full: not acknowledged, try again later
            time.sleep(0.2)
            continue
        print(tid, flush=True)
        time.sleep(0.05)


# ---- probes and faults ----------------------------------------------------------------------------------
def in_warehouse(w: World, turn_id: str) -> bool:
    if not w.settings.warehouse_path.exists():
        return False
    try:
        with connect(w.settings.warehouse_path, read_only=True, timeout_s=10) as con:
            return bool(con.execute("SELECT count(*) FROM turns WHERE turn_id = ?", [turn_id]).fetchone()[0])
    except (WarehouseBusy, OSError):
        return False


def probe(w: World, timeout: float = 300.0) -> float:
    """Seconds until a fresh request is answered and its turn is in the warehouse."""
    t0 = time.monotonic()
    turn_id = None
    while time.monotonic() - t0 < timeout:
        if turn_id is None:
            try:
                r = httpx.post(
                    f"{w.url}/v1/chat/completions",
                    timeout=30,
                    json={
                        "model": "flywheel",
                        "user": "probe",
                        "max_tokens": 1,
                        "messages": [{"role": "user", "content": f"probe {uuid.uuid4().hex[:6]}"}],
                    },
                )
                if r.status_code == 200:
                    turn_id = r.json()["id"].removeprefix("chatcmpl-")
            except httpx.HTTPError:
                pass
        elif in_warehouse(w, turn_id):
            return time.monotonic() - t0
        time.sleep(0.3)
    raise RuntimeError(f"no recovery within {timeout:.0f}s")


def inject(w: World, fault: str, args, rng: random.Random, log) -> dict:
    """Inject one fault, clear it, and return its record (recovery measured from the moment it was cleared)."""
    detail: dict = {}
    if fault == "app_kill":
        w.kill("app")
        w.start_app()
        detail["restart_s"] = round(w.app_ready(), 1)  # the model reload; recovery_s is counted after it
    elif fault == "ingest_kill":
        w.kill("ingest")
        w.start_ingest()
    elif fault == "producer_kill":
        w.kill("producer")
        w.start_producer()
    elif fault == "broker_kill":
        node = rng.choice(kafka_local.cluster_nodes(w.settings))
        kafka_local.stop_node(node, kill=True)
        detail["broker"] = node.node_id
        time.sleep(args.outage_s)
        kafka_local.start_node(
            w.settings, node, kafka_local.cluster_nodes(w.settings), kafka_local.cluster_id(w.settings)
        )
    elif fault == "broker_outage":
        w.kafka_stop()
        time.sleep(args.outage_s)
        w.kafka_start()
    elif fault == "reader_holds":
        hold = PATIENCE_S * 2
        code = (
            "import sys, time; from feedback.warehouse import connect\n"
            f"with connect(sys.argv[1], read_only=True, timeout_s=60):\n    time.sleep({hold})"
        )
        subprocess.run(
            [sys.executable, "-c", code, str(w.settings.warehouse_path)], env=w.env, cwd=REPO, check=True, timeout=120
        )
        detail["held_s"] = hold
    elif fault == "prefect_down":
        from infra import prefect_server

        pid = int((prefect_server.prefect_dir(w.settings) / "server.pid").read_text())
        os.killpg(pid, signal.SIGKILL)
        r = subprocess.run(
            [sys.executable, "-m", "cli.main", "run", "volume-trigger", "--json"],
            env=w.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        detail["trigger_exit"] = r.returncode
        detail["trigger_output"] = (r.stdout.strip().splitlines() or [r.stderr.strip()[-300:]])[-1][:300]
        prefect_server.start(w.settings, timeout_s=300)
    elif fault == "disk_full":
        filler = w.spool_dir / "filler"
        free = shutil.disk_usage(w.spool_dir).free
        if w.spool_kind.startswith("tmpfs"):
            try:
                with open(filler, "wb") as f:
                    f.write(b"\0" * free)
            except OSError as e:  # ENOSPC at open or write: the outboxes already filled it, the fault holds
                if e.errno != errno.ENOSPC:
                    raise
        detail["filled_bytes"] = free
        time.sleep(args.outage_s)
        filler.unlink(missing_ok=True)
    else:
        raise ValueError(f"unknown fault {fault!r}")
    return detail


# ---- the campaign ---------------------------------------------------------------------------------------
def run(args) -> dict:
    rng = random.Random(args.seed)
    chosen = SUITE_FAULTS if args.faults == "suite" else (args.faults.split(",") if args.faults else ALL_FAULTS)
    faults = list(chosen)
    if args.brokers < 3:
        faults = [f for f in faults if f != "broker_kill"]
    if not args.prefect:
        faults = [f for f in faults if f != "prefect_down"]
    rng.shuffle(faults)
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
    w = make_world(args.brokers, args.prefect)
    ledger = Ledger()
    stop = threading.Event()
    records: list[dict] = []
    t_start = time.monotonic()
    try:
        w.kafka_start()
        log(f"kafka: {w.brokers} broker(s) on {w.settings.kafka_bootstrap}; outboxes on {w.spool_kind}")
        if args.prefect:
            from infra import prefect_server

            prefect_server.start(w.settings, timeout_s=300)
        w.start_ingest()
        w.start_app()
        log(f"app ready in {w.app_ready():.0f}s")
        w.start_producer()
        users = [
            threading.Thread(target=user_loop, args=(w, f"sim{i}", ledger, stop, random.Random(i)), daemon=True)
            for i in range(args.users)
        ]
        for u in users:
            u.start()
        log(f"baseline recovery probe: {probe(w):.1f}s")
        per_gap = max(1.0, args.seconds / max(1, len(faults)))
        for fault in faults:
            stop.wait(rng.uniform(0.3, 1.0) * per_gap)
            at = time.monotonic() - t_start
            log(f"[{at:6.1f}s] fault: {fault}")
            detail = inject(w, fault, args, rng, log)
            rec = probe(w)
            records.append({"fault": fault, "at_s": round(at, 1), "recovery_s": round(rec, 2), **detail})
            log(f"          recovered in {rec:.1f}s {detail or ''}")
        stop.set()
        for u in users:
            u.join(90)
        w.stop("producer", timeout=40)  # it sends what its outbox holds, then exits
        result = settle_and_compare(w, ledger, log)
    finally:
        stop.set()
        teardown(w, args.prefect)
    recs = [r["recovery_s"] for r in records]
    result.update(
        {
            "faults": records,
            "recovery_s_p50": round(statistics.median(recs), 2) if recs else None,
            "recovery_s_max": max(recs) if recs else None,
            "brokers": args.brokers,
            "users": args.users,
            "spool_filesystem": w.spool_kind,
            "seconds": round(time.monotonic() - t_start, 1),
            "targets": {"lost_ok": result["lost"] == 0, "duplicated_ok": result["duplicated"] == 0},
            "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1)},
        }
    )
    if not args.keep:
        shutil.rmtree(w.home, ignore_errors=True)
    return result


def settle_and_compare(w: World, ledger: Ledger, log) -> dict:
    """Let the outboxes drain and ingest catch up, then look up every acknowledged id."""
    produced = {line.strip() for line in w.producer_log.read_text().splitlines() if line.strip()}
    want_turns = ledger.turns | produced
    deadline = time.monotonic() + 180
    seen_t: dict[str, int] = {}
    seen_r: dict[str, int] = {}
    while time.monotonic() < deadline:
        with connect(w.settings.warehouse_path, read_only=True, timeout_s=30) as con:
            seen_t = dict(con.execute("SELECT turn_id, count(*) FROM turns GROUP BY turn_id").fetchall())
            seen_r = dict(con.execute("SELECT event_id, count(*) FROM feedback GROUP BY event_id").fetchall())
        if want_turns <= set(seen_t) and ledger.ratings <= set(seen_r):
            break
        time.sleep(2)
    lost = len(want_turns - set(seen_t)) + len(ledger.ratings - set(seen_r))
    duplicated = sum(n - 1 for n in seen_t.values() if n > 1) + sum(n - 1 for n in seen_r.values() if n > 1)
    log(f"acknowledged {len(want_turns) + len(ledger.ratings)}; lost {lost}; duplicated {duplicated}")
    return {
        "events_acknowledged": len(want_turns) + len(ledger.ratings),
        "turns_acknowledged": len(ledger.turns),
        "ratings_acknowledged": len(ledger.ratings),
        "producer_events_acknowledged": len(produced),
        "lost": lost,
        "duplicated": duplicated,
        "requests_refused": ledger.refused,
        "responses_5xx": ledger.errors_5xx,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brokers", type=int, default=1, choices=(1, 3))
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=60.0, help="spread the faults over about this long")
    ap.add_argument(
        "--faults", default="", help=f"comma-separated subset of {', '.join(ALL_FAULTS)}, or 'suite' (SUITE_FAULTS)"
    )
    ap.add_argument("--outage-s", type=float, default=5.0, help="how long an outage or a full disk lasts")
    ap.add_argument("--prefect", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--keep", action="store_true", help="keep the run's FLYWHEEL_HOME (logs) afterwards")
    ap.add_argument("--out", default="", help="also write the JSON result to this file")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--producer-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.producer_child:
        producer_child()
        return
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
