"""The fleet rehearsal on one machine (issue 20, reduced form): simulated users chat and rate through the load
balancer (Debian's nginx, ``infra.balancer``) in front of app replicas that share one home, while a replica is
killed (SIGKILL) and restarted; with ``--postgres``, the shared PostgreSQL is stopped and started; with
``--servers``, the model runs in a model server apart from the replicas (``FLYWHEEL_SERVING=servers``), which is
killed (SIGKILL) once and restarted by its manager.

    python -m benchmarks.fleet --json                      # 2 replicas, 4 users, 60 s, SQLite state
    python -m benchmarks.fleet --postgres --seconds 90     # state in a local PostgreSQL (flywheel db), stopped once
    python -m benchmarks.fleet --servers --postgres        # and the model apart, in a model server killed once

Every acknowledged rating (200, or 202 queued through an outage) is looked for in the replicas' spools afterwards
(no broker runs: events wait there, unsealed with the home's payload keys), so ``ratings_lost`` and
``ratings_duplicated`` are counted, not inferred. ``sessions_lost`` counts users who can no longer rate a turn
they were served before the faults, through whichever replica the balancer picks.

Not in this form (see issue 20): network namespaces per service, three brokers, and the flood's
``victim_ttft_p99_ratio`` (``python -m benchmarks.hostile``). On 2 cores the rehearsal shows failover and
bookkeeping, not throughput.
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
from infra.ports import free_port

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "fleet-rehearsal-admin-token"
REQUEST_TIMEOUT_S = 90.0  # a request slower than this counts as hung


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
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Fleet:
    """App replicas on one home behind the balancer; ``url`` is the balancer's."""

    def __init__(
        self,
        home: Path,
        replicas: int = 2,
        answer_tokens: int = 8,
        database_url: str | None = None,
        servers: bool = False,
    ):
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.ports = [free_port() for _ in range(replicas)]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base = {
            **os.environ,
            "FLYWHEEL_HOME": str(home),
            "FLYWHEEL_APP_HOST": "127.0.0.1",
            "FLYWHEEL_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",  # closed: every event waits in a spool
            "FLYWHEEL_ADMIN_TOKEN": ADMIN_TOKEN,
            "FLYWHEEL_API_AUTH": "keys",
            "FLYWHEEL_APP_MAX_NEW_TOKENS": str(answer_tokens),
            "FLYWHEEL_BASE_MODEL": os.environ.get("FLYWHEEL_BASE_MODEL", str(REPO / ".flywheel" / "models" / "base")),
            "PYTHONPATH": str(REPO),
        }
        if database_url:
            base["FLYWHEEL_APP_DATABASE_URL"] = database_url
        if servers:  # two per version: losing one costs only what it was streaming
            base["FLYWHEEL_SERVING"] = "servers"
            base["FLYWHEEL_MODEL_SERVERS_PER_VERSION"] = "2"
        self.env = base
        py = sys.executable
        self.manager = (
            Proc("model-servers", [py, "-m", "app.model_servers"], base, home / "model-servers.log")
            if servers
            else None
        )
        self.replicas = [
            Proc(f"app-{i}", [py, "-m", "app.server"], {**base, "FLYWHEEL_APP_PORT": str(p)}, home / f"app-{i}.log")
            for i, p in enumerate(self.ports)
        ]
        upstreams = [a for p in self.ports for a in ("--upstream", f"127.0.0.1:{p}")]
        self.balancer = Proc(
            "balancer",
            [py, "-m", "infra.balancer", "--listen", f"127.0.0.1:{self.port}", "--dir", str(home / "balancer")]
            + upstreams,
            base,
            home / "balancer.log",
        )

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
                if httpx.get(f"http://127.0.0.1:{self.ports[i]}/healthz", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{r.name} did not answer in {timeout_s:.0f} s")

    def replica_of(self, response: httpx.Response) -> int | None:
        """Which replica served a response (the balancer's ``X-Flywheel-Replica``: the last address tried)."""
        addr = (response.headers.get("x-flywheel-replica") or "").split(",")[-1].strip()
        port = int(addr.rsplit(":", 1)[1]) if ":" in addr else None
        return self.ports.index(port) if port in self.ports else None

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


def ratings_in_spools(fleet: Fleet) -> list[tuple[str, str, str]]:
    """(user, turn, rating) of every rating event in the home's app spools (the replicas must be stopped)."""
    from feedback.events import Feedback, parse_event
    from feedback.shred import KeyStore, is_sealed
    from feedback.spool import Spool

    settings = fleet.settings()
    keys = KeyStore(settings)
    out = []
    try:
        for d in sorted(settings.spool_path.glob("app*")):
            spool = Spool(settings.spool_path, d.name)
            try:
                for _, topic, _, value in spool.peek(1_000_000):
                    if topic != settings.topic_feedback:
                        continue
                    raw = keys.open(value) if is_sealed(value) else value
                    event = parse_event(raw) if isinstance(raw, bytes) else None
                    if isinstance(event, Feedback):
                        out.append((event.user_id, event.turn_id, event.value))
            finally:
                spool.close()
    finally:
        keys.close()
    return out


def rehearse(
    home: Path, replicas: int = 2, users: int = 4, seconds: float = 60, postgres: bool = False, servers: bool = False
) -> dict:
    """Run the rehearsal; returns the report (see the module's docstring)."""
    from infra import postgres as pg

    t_start = time.monotonic()
    db_settings = None
    url = None
    if postgres:
        from feedback.settings import Settings

        db_settings = Settings(home=home / "db", db_port=free_port())
        url = pg.start(db_settings).url
    fleet = Fleet(home / "fleet", replicas=replicas, database_url=url, servers=servers)
    report: dict = {
        "replicas": replicas,
        "serving": "servers" if servers else "embedded",
        "users": users,
        "seconds": seconds,
        "store": "postgres" if postgres else "sqlite",
    }
    try:
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
        failover: dict[str, list[float]] = {"replica": [], "postgres": [], "model_server": []}
        restart: dict[str, list[float]] = {"replica": [], "postgres": [], "model_server": []}
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
    finally:
        fleet.stop()
        if postgres:
            pg.destroy(db_settings)
    found = ratings_in_spools(fleet)
    emitted = Counter((turn, value) for _user, turn, value in found)  # (an API user's id carries its key's prefix)
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
    p.add_argument("--home", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="flywheel-fleet-") as tmp:
        report = rehearse(args.home or Path(tmp), args.replicas, args.users, args.seconds, args.postgres, args.servers)
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
