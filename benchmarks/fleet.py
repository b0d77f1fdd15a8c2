"""The fleet rehearsal on one machine (issue 20): simulated users chat and rate through the load balancer (Debian's
nginx, ``infra.balancer``) in front of app replicas that share one home, while a replica is killed (SIGKILL) and
restarted; with ``--postgres``, the shared PostgreSQL is stopped and started; with ``--servers``, the model runs in
model servers apart from the replicas (``FLYWHEEL_SERVING=servers``, two per version), one of which is killed
(SIGKILL) and restarted by its manager.

``--netns`` is the whole rehearsal (root only): every process gets a network namespace of its own with its own
address on one bridge (``infra.netns``): the balancer, each replica, two model servers, three Kafka brokers (RF 3,
min ISR 2) and PostgreSQL, and a broker is SIGKILLed and restarted too. The namespaces are removed when it ends,
on Ctrl-C or SIGTERM as well; a run killed outright leaves them to the next run, which removes them first.

    python -m benchmarks.fleet --json                      # 2 replicas, 4 users, 60 s, SQLite state, loopback
    python -m benchmarks.fleet --postgres --seconds 90     # state in a local PostgreSQL (flywheel db), stopped once
    python -m benchmarks.fleet --servers --postgres        # and the model apart, in a model server killed once
    python -m benchmarks.fleet --netns --json              # all of it, each process in its own namespace

Every acknowledged rating (200, or 202 queued through an outage) is looked for afterwards: in the replicas'
spools and, with brokers, in the feedback topic (one event per id: ingest keeps one copy of each), unsealed with
the home's payload keys, so ``ratings_lost`` and ``ratings_duplicated`` are counted, not inferred.
``sessions_lost`` counts users who can no longer rate a turn they were served before the faults, through whichever
replica the balancer picks.

Not here: the flood's ``victim_ttft_p99_ratio`` (``python -m benchmarks.hostile``). On 2 cores the rehearsal shows
failover and bookkeeping, not throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.api import COMPLETION_PREFIX
from infra import procs
from infra.netns import Netns
from infra.ports import free_port

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "fleet-rehearsal-admin-token"
REQUEST_TIMEOUT_S = 90.0  # a request slower than this counts as hung
NETNS_TAG = "fwfl"  # the rehearsal's namespaces are fwfl-lb, fwfl-app-0, ...; its bridge fwfl-br


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, cwd=REPO, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        procs.end(self.proc, 30)


class Fleet:
    """App replicas on one home behind the balancer; ``url`` is the balancer's. With ``net`` (``--netns``), every
    process runs in its own network namespace at its own address: the balancer in ``lb``, replica i in ``app-i``,
    model server i in ``ms-i``; ``kafka`` is then the brokers' bootstrap list (else a closed port: every event
    waits in a spool)."""

    def __init__(
        self,
        home: Path,
        replicas: int = 2,
        answer_tokens: int = 8,
        database_url: str | None = None,
        servers: bool = False,
        net: Netns | None = None,
        kafka: str | None = None,
    ):
        self.home = home
        self.net = net
        home.mkdir(parents=True, exist_ok=True)
        if net is None:
            self.addrs = [f"127.0.0.1:{free_port()}" for _ in range(replicas)]
            listen = f"127.0.0.1:{free_port()}"
        else:
            self.addrs = [f"{net.addr(f'app-{i}')}:7860" for i in range(replicas)]
            listen = f"{net.addr('lb')}:7860"
        self.url = f"http://{listen}"
        base = {
            **os.environ,
            "FLYWHEEL_HOME": str(home),
            "FLYWHEEL_APP_HOST": "127.0.0.1",
            "FLYWHEEL_KAFKA_BOOTSTRAP": kafka or f"127.0.0.1:{free_port()}",
            "FLYWHEEL_ADMIN_TOKEN": ADMIN_TOKEN,
            "FLYWHEEL_API_AUTH": "keys",
            "FLYWHEEL_APP_MAX_NEW_TOKENS": str(answer_tokens),
            "FLYWHEEL_BASE_MODEL": os.environ.get("FLYWHEEL_BASE_MODEL", str(REPO / ".flywheel" / "models" / "base")),
            "PYTHONPATH": str(REPO),
        }
        if database_url:
            base["FLYWHEEL_APP_DATABASE_URL"] = database_url
        if kafka:  # three brokers: every topic replicated on all of them, writes acknowledged by two
            base |= {"FLYWHEEL_KAFKA_REPLICATION": "3", "FLYWHEEL_KAFKA_MIN_INSYNC": "2"}
        if servers:  # two per version: losing one costs only what it was streaming
            base["FLYWHEEL_SERVING"] = "servers"
            base["FLYWHEEL_MODEL_SERVERS_PER_VERSION"] = "2"
        if net is not None:
            base["FLYWHEEL_APP_ALLOWED_HOSTS"] = ",".join(a.split(":")[0] for a in [listen, *self.addrs])
            if servers:  # off loopback a model server wants a bearer token; the app's pool sends it
                base["FLYWHEEL_MODEL_SERVER_TOKEN"] = "fleet-rehearsal-model-server-token"
                base["FLYWHEEL_MODEL_SERVER_PLACES"] = ",".join(
                    f"{net.ns(f'ms-{i}')}/{net.addr(f'ms-{i}')}" for i in range(2)
                )
        self.env = base
        py = sys.executable
        self.manager = (
            Proc("model-servers", [py, "-m", "app.model_servers"], base, home / "model-servers.log")
            if servers
            else None
        )
        self.replicas = []
        for i, addr in enumerate(self.addrs):
            host, port = addr.rsplit(":", 1)
            env = {**base, "FLYWHEEL_APP_HOST": host, "FLYWHEEL_APP_PORT": port}
            argv = [*self._inside(f"app-{i}"), py, "-m", "app.server"]
            self.replicas.append(Proc(f"app-{i}", argv, env, home / f"app-{i}.log"))
        upstreams = [a for addr in self.addrs for a in ("--upstream", addr)]
        self.balancer = Proc(
            "balancer",
            [*self._inside("lb"), py, "-m", "infra.balancer", "--listen", listen, "--dir", str(home / "balancer")]
            + upstreams,
            base,
            home / "balancer.log",
        )

    def _inside(self, name: str) -> list[str]:
        return self.net.run_in(name) if self.net is not None else []

    def start(self, timeout_s: float = 600) -> Fleet:
        if self.manager is not None:
            self.manager.start()
        for r in self.replicas:
            r.start()
        self.balancer.start()
        for i in range(len(self.replicas)):
            self.wait_replica(i, timeout_s)
        return self

    def wait_replica(self, i: int, timeout_s: float = 600) -> float:
        """Seconds until replica ``i`` answers its health check."""
        t0, r = time.monotonic(), self.replicas[i]
        while time.monotonic() - t0 < timeout_s:
            if not r.alive():
                raise RuntimeError(f"{r.name} exited: {r.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://{self.addrs[i]}/healthz", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{r.name} did not answer in {timeout_s:.0f} s")

    def replica_of(self, response: httpx.Response) -> int | None:
        """Which replica served a response (the balancer's ``X-Flywheel-Replica``: the last address tried)."""
        addr = (response.headers.get("x-flywheel-replica") or "").split(",")[-1].strip()
        return self.addrs.index(addr) if addr in self.addrs else None

    def create_keys(self, n: int) -> list[str]:
        from app.keys import KeyStore

        store = KeyStore(self.settings())
        try:
            return [store.create(f"fleet-user-{i}")[1] for i in range(n)]
        finally:
            store.close()

    def settings(self):
        from pydantic import SecretStr

        from feedback.settings import Settings

        url = self.env.get("FLYWHEEL_APP_DATABASE_URL")
        return Settings(home=self.home, app_database_url=SecretStr(url) if url else None)

    def model_server_pid(self) -> int | None:
        """The pid of the default version's model server (``--servers``), from the manager's published address."""
        import psutil

        from app.model_servers import published_servers

        if self.net is not None:  # the first model server's namespace holds it alone
            return next(iter(self.net.pids("ms-0")), None)
        urls = published_servers(self.settings()).get("base")
        port = int(urls[0].rsplit(":", 1)[1]) if urls else None
        for conn in psutil.net_connections("tcp") if port else ():
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                return conn.pid
        return None

    def wait_model_server(self, timeout_s: float = 300) -> float:
        """Seconds until the manager publishes both of the default version's servers again."""
        from app.model_servers import published_servers

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if len(published_servers(self.settings()).get("base", [])) == 2 and self.model_server_pid():
                return time.monotonic() - t0
            time.sleep(0.2)
        raise RuntimeError(f"the model server did not come back in {timeout_s:.0f} s")

    def stop(self) -> None:
        self.balancer.stop()
        for r in self.replicas:
            r.stop()
        if self.manager is not None:
            self.manager.stop()  # it stops its servers on the way out


# ---- simulated users ----------------------------------------------------------------------------------------
@dataclass
class Tally:
    requests: int = 0
    answered: int = 0
    refused_retryable: int = 0
    broken: int = 0  # the connection ended mid-request (a replica killed under it): a clean error, retried
    hung: int = 0
    other: list[str] = field(default_factory=list)
    acknowledged: list[tuple[str, str]] = field(default_factory=list)  # (turn, rating) per acknowledged rating
    first_turn: dict[str, str] = field(default_factory=dict)
    answered_at: list[float] = field(default_factory=list)
    by_replica: dict[int, int] = field(default_factory=dict)
    until: float = 0.0  # users chat until then; extended past the last fault, so every fault happens under load
    mu: threading.Lock = field(default_factory=threading.Lock)


def user_loop(fleet: Fleet, key: str, user: str, tally: Tally) -> None:
    headers = {"Authorization": f"Bearer {key}", "X-Flywheel-Consent": "1"}
    n = 0
    with httpx.Client(base_url=f"{fleet.url}/v1", headers=headers, timeout=REQUEST_TIMEOUT_S) as client:
        while time.monotonic() < tally.until:
            n += 1
            body = {
                "model": "flywheel",
                "user": user,
                "max_tokens": 8,
                "messages": [{"role": "user", "content": f"Q{n}: name a colour."}],
            }
            turn = _call(client, fleet, "/chat/completions", body, tally)
            if turn is None:
                time.sleep(0.5)
                continue
            tally.first_turn.setdefault(user, turn)
            rating = "up" if n % 2 else "down"
            for _ in range(3):  # a rating is retried until acknowledged (the same rating twice is one rating)
                ack = _call(client, fleet, "/feedback", {"turn_id": turn, "rating": rating, "user": user}, tally)
                if ack is not None:
                    with tally.mu:
                        tally.acknowledged.append((turn, rating))
                    break
                time.sleep(0.5)


def _call(client: httpx.Client, fleet: Fleet, path: str, body: dict, tally: Tally) -> str | None:
    """The turn id (a chat) or "ok" (a rating) when answered; None when refused, broken or hung (counted)."""
    with tally.mu:
        tally.requests += 1
    try:
        r = client.post(path, json=body)
    except httpx.TimeoutException:
        with tally.mu:
            tally.hung += 1
        return None
    except httpx.TransportError:
        with tally.mu:
            tally.broken += 1
        return None
    with tally.mu:
        if r.status_code in (200, 202):
            tally.answered += 1
            tally.answered_at.append(time.monotonic())
            i = fleet.replica_of(r)
            if i is not None:
                tally.by_replica[i] = tally.by_replica.get(i, 0) + 1
            return r.json()["id"].removeprefix(COMPLETION_PREFIX) if path == "/chat/completions" else "ok"
        if r.status_code in (429, 503) and r.headers.get("retry-after"):
            tally.refused_retryable += 1
        elif r.status_code == 502 and fleet.replica_of(r) is not None:  # the replica died under this request
            tally.broken += 1
        elif r.status_code == 500 and '"model_error"' in r.text:  # its model server died under it ("please retry")
            tally.broken += 1
        else:
            tally.other.append(f"{r.status_code} {r.text[:120]}")
    return None


# ---- faults ---------------------------------------------------------------------------------------------------
def first_answer_after(tally: Tally, t: float, timeout_s: float = 60) -> float | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with tally.mu:
            later = [a for a in tally.answered_at if a > t]
        if later:
            return round(min(later) - t, 3)
        time.sleep(0.05)
    return None


def ratings_emitted(fleet: Fleet, kafka: bool = False) -> dict[str, tuple[str, str]]:
    """event id -> (turn, rating) of every rating event in the home's app spools and, with ``kafka``, in the
    brokers' feedback topic (the replicas must be stopped). An event in both, or twice in the topic (a producer's
    retry), is one event: ingest keeps one copy per id."""
    from feedback.events import Feedback, parse_event
    from feedback.shred import KeyStore, is_sealed
    from feedback.spool import Spool

    settings = fleet.settings()
    keys = KeyStore(settings)
    out: dict[str, tuple[str, str]] = {}

    def add(value: bytes) -> None:
        raw = keys.open(value) if is_sealed(value) else value
        event = parse_event(raw) if isinstance(raw, bytes) else None
        if isinstance(event, Feedback):
            out[event.event_id] = (event.turn_id, event.value)

    try:
        for d in sorted(settings.spool_path.glob("app*")):
            spool = Spool(settings.spool_path, d.name)
            try:
                for _, topic, _, value in spool.peek(1_000_000):
                    if topic == settings.topic_feedback:
                        add(value)
            finally:
                spool.close()
        if kafka:
            from kafka import KafkaConsumer

            consumer = KafkaConsumer(
                settings.topic_feedback,
                bootstrap_servers=fleet.env["FLYWHEEL_KAFKA_BOOTSTRAP"].split(","),
                auto_offset_reset="earliest",
                enable_auto_commit=False,
                consumer_timeout_ms=10_000,
            )
            try:
                for message in consumer:
                    add(message.value)
            finally:
                consumer.close()
    finally:
        keys.close()
    return out


class Brokers:
    """Three Kafka brokers, each in its own namespace (``kafka-1`` .. ``kafka-3``), one killed and restarted."""

    def __init__(self, home: Path, net: Netns):
        from feedback.settings import Settings
        from infra import kafka_local

        self.kl = kafka_local
        self.settings = Settings(home=home, kafka_heap="384m")
        d = kafka_local.cluster_dir(self.settings)
        self.nodes = [
            kafka_local.Node(i, net.addr(f"kafka-{i}"), 9092, 9093, d / f"node-{i}", net.ns(f"kafka-{i}"))
            for i in (1, 2, 3)
        ]
        self.bootstrap = ",".join(n.address for n in self.nodes)

    def start(self) -> None:
        self.kl.start_cluster(self.settings, 3, nodes=self.nodes, quiet=True)

    def kill(self, i: int) -> None:
        self.kl.stop_node(self.nodes[i], kill=True)

    def restart(self, i: int, timeout_s: float = 120) -> float:
        """Seconds until broker ``i`` answers again."""
        t0, node = time.monotonic(), self.nodes[i]
        self.kl.start_node(self.settings, node, self.nodes, self.kl.cluster_id(self.settings))
        one = self.kl.cluster_settings(self.settings, self.nodes).model_copy(update={"kafka_bootstrap": node.address})
        while time.monotonic() - t0 < timeout_s:
            if self.kl.answering(one, timeout=1.0):
                return time.monotonic() - t0
            time.sleep(0.3)
        raise RuntimeError(f"broker {node.node_id} did not answer in {timeout_s:.0f} s")

    def stop(self) -> None:
        self.kl.stop_cluster(self.settings, timeout_s=15)


def rehearse(
    home: Path,
    replicas: int = 2,
    users: int = 4,
    seconds: float = 60,
    postgres: bool = False,
    servers: bool = False,
    netns: bool = False,
    netns_tag: str = NETNS_TAG,
    subnet: str = "10.213.0.0/24",
) -> dict:
    """Run the rehearsal; returns the report (see the module's docstring). ``netns`` is the whole rehearsal:
    model servers, PostgreSQL and three brokers too, every process in a network namespace of its own."""
    from feedback.settings import Settings
    from infra import postgres as pg

    t_start = time.monotonic()
    postgres, servers = postgres or netns, servers or netns
    net = brokers = db_settings = url = fleet = None
    report: dict = {
        "replicas": replicas,
        "serving": "servers" if servers else "embedded",
        "users": users,
        "seconds": seconds,
        "store": "postgres" if postgres else "sqlite",
        "brokers": 3 if netns else 0,
        "network": "a namespace per process" if netns else "loopback",
    }
    try:
        if netns:
            names = ["lb", *(f"app-{i}" for i in range(replicas)), "ms-0", "ms-1", "kafka-1", "kafka-2", "kafka-3"]
            net = Netns(netns_tag, [*names, "pg"], subnet).create()
            report["addresses"] = {n: net.addr(n) for n in net.names}
            brokers = Brokers(home / "kafka", net)
            brokers.start()
        if postgres:
            db_settings = Settings(home=home / "db", db_port=5432 if netns else free_port())
            where = {"host": net.addr("pg"), "netns": net.ns("pg"), "allow": str(net.net)} if net else {}
            url = pg.start(db_settings, **where).url
        fleet = Fleet(
            home / "fleet",
            replicas=replicas,
            database_url=url,
            servers=servers,
            net=net,
            kafka=brokers.bootstrap if brokers else None,
        )
        fleet.start()
        keys = fleet.create_keys(users)
        tally = Tally()
        t_users = time.monotonic()
        tally.until = float("inf")  # until the faults are over (below)
        threads = [
            threading.Thread(target=user_loop, args=(fleet, keys[i], f"user-{i}", tally), daemon=True)
            for i in range(users)
        ]
        for t in threads:
            t.start()
        failover: dict[str, list[float]] = {"replica": [], "postgres": [], "model_server": [], "broker": []}
        restart: dict[str, list[float]] = {"replica": [], "postgres": [], "model_server": [], "broker": []}
        time.sleep(seconds * 0.2)
        victim = max(range(replicas), key=lambda i: tally.by_replica.get(i, 0))
        t_kill = time.monotonic()
        fleet.replicas[victim].kill()
        f = first_answer_after(tally, t_kill)
        if f is not None:
            failover["replica"].append(f)
        time.sleep(min(5.0, seconds * 0.1))
        fleet.replicas[victim].start()
        restart["replica"].append(round(fleet.wait_replica(victim), 1))
        if servers and (pid := fleet.model_server_pid()) is not None:
            time.sleep(seconds * 0.1)
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            restart["model_server"].append(round(fleet.wait_model_server(), 1))
            f = first_answer_after(tally, t_kill)
            if f is not None:
                failover["model_server"].append(f)
        if brokers is not None:  # the first broker: SIGKILL, then back; two of three keep acknowledging writes
            time.sleep(seconds * 0.1)
            t_kill = time.monotonic()
            brokers.kill(0)
            f = first_answer_after(tally, t_kill)
            if f is not None:
                failover["broker"].append(f)
            time.sleep(min(10.0, seconds * 0.15))
            restart["broker"].append(round(brokers.restart(0), 1))
        if postgres:
            time.sleep(seconds * 0.1)
            t_kill = time.monotonic()
            pg.stop(db_settings)
            f = first_answer_after(tally, t_kill)
            if f is not None:
                failover["postgres"].append(f)
            time.sleep(min(10.0, seconds * 0.15))
            t0 = time.monotonic()
            pg.start(db_settings)
            restart["postgres"].append(round(time.monotonic() - t0, 1))
        tally.until = max(t_users + seconds, time.monotonic() + seconds * 0.2)  # a while after the last fault, too
        for t in threads:
            t.join(timeout=seconds + REQUEST_TIMEOUT_S)
        # sessions: every user can still rate the first turn they were served, through whichever replica answers
        lost = 0
        for user, turn in sorted(tally.first_turn.items()):
            r = httpx.post(
                f"{fleet.url}/v1/feedback",
                json={"turn_id": turn, "rating": "up", "user": user},
                headers={"Authorization": f"Bearer {keys[int(user.split('-')[1])]}"},
                timeout=30,
            )
            if r.status_code not in (200, 202):
                lost += 1
            else:
                tally.acknowledged.append((turn, "up"))
        if postgres:  # the outboxes land what waited (they replay every 5 s)
            time.sleep(12)
        if fleet is not None:
            fleet.stop()
        found = ratings_emitted(fleet, kafka=brokers is not None)
    finally:
        if fleet is not None:
            fleet.stop()
        if brokers is not None:
            brokers.stop()
        if db_settings is not None:
            pg.destroy(db_settings)
        if net is not None:
            net.destroy()
    emitted = Counter(found.values())
    acked = Counter(tally.acknowledged)
    report.update(
        {
            "requests": tally.requests,
            "answered": tally.answered,
            "refused_retryable": tally.refused_retryable,
            "broken_connections": tally.broken,
            "hung": tally.hung,
            "other_errors": tally.other[:5],
            "answered_by_replica": {str(k): v for k, v in sorted(tally.by_replica.items())},
            "sessions_lost": lost,
            "ratings_acknowledged": acked.total(),
            "ratings_lost": (acked - emitted).total(),  # acknowledged, and not in any spool
            "ratings_duplicated": (emitted - acked).total(),  # in a spool more often than acknowledged
            "failover_s": {
                k: {"p50": statistics.median(v), "max": max(v), "n": len(v)} for k, v in failover.items() if v
            },
            "restart_s": {k: v for k, v in restart.items() if v},
            "wall_s": round(time.monotonic() - t_start, 1),
        }
    )
    return report


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--postgres", action="store_true", help="shared state in a local PostgreSQL, stopped once")
    p.add_argument("--servers", action="store_true", help="the model in a model server apart, killed once")
    p.add_argument(
        "--netns", action="store_true", help="all of it (servers, PostgreSQL, 3 brokers), a namespace per process"
    )
    p.add_argument("--netns-tag", default=NETNS_TAG, help="prefix of the namespaces' names (1-6 letters or digits)")
    p.add_argument("--subnet", default="10.213.0.0/24", help="the namespaces' addresses (the bridge has the first)")
    p.add_argument("--home", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    import tempfile

    def interrupted(*_):  # SIGTERM unwinds like Ctrl-C: every finally runs, the namespaces go
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        with tempfile.TemporaryDirectory(prefix="flywheel-fleet-") as tmp:
            report = rehearse(
                args.home or Path(tmp),
                args.replicas,
                args.users,
                args.seconds,
                args.postgres,
                args.servers,
                args.netns,
                args.netns_tag,
                args.subnet,
            )
    except KeyboardInterrupt:
        print("fleet: interrupted; everything it started is stopped (and its namespaces removed)", file=sys.stderr)
        sys.exit(130)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"fleet: {report['replicas']} replicas, {report['users']} users, {report['requests']} requests: "
        f"{report['answered']} answered, {report['refused_retryable']} refused (retryable), "
        f"{report['broken_connections']} broken mid-request, {report['hung']} hung"
    )
    print(
        f"sessions lost {report['sessions_lost']}; ratings acknowledged {report['ratings_acknowledged']}, "
        f"lost {report['ratings_lost']}, duplicated {report['ratings_duplicated']}"
    )
    for kind, f in report["failover_s"].items():
        print(
            f"failover after a {kind} fault: p50 {f['p50']} s, max {f['max']} s; back in {report['restart_s'][kind]} s"
        )


if __name__ == "__main__":
    main()
