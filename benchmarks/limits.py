"""Rate limits across app replicas: how far two replicas together overshoot a key's rate, and what a check costs.

    python -m benchmarks.limits [--seconds 3] [--rate 20] [--burst 5] [--postgres] [--json]

Two processes (two app replicas on one machine) admit requests on one key as fast as they can, both starting at
the same instant, with
- ``shared``: the product's buckets in ``$FLYWHEEL_HOME/app/limits.sqlite`` (``app.keys.SharedBuckets``), and
- ``local``: each process counting alone (the baseline: what one in-memory bucket per replica gives), and
- ``postgres`` (with ``--postgres``): the buckets in a local PostgreSQL of its own (``app.database.PgBuckets``),
in the same run. ``rate_limit_overshoot`` is the admitted count over the key's limit for the span both ran
(burst + rate x seconds): 1.0 is exact, 2.0 is twice the rate. ``admit_us`` is one check's latency in one process
(p50, p99), for both. Results: ``benchmarks/results/limits.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "limits.json"
KEY = "key:bench"


def _limits(store: str, rate: float, burst: int, shared: bool):
    """Limits on ``store``: a PostgreSQL URL (``PgBuckets``) or a SQLite file (``SharedBuckets``); or, not shared,
    one process's own buckets."""
    from app.database import PgBuckets
    from app.keys import CallerLimits, SharedBuckets

    if not shared:
        return CallerLimits(rate, burst, 1)
    if store.startswith("postgresql://"):
        return CallerLimits(rate, burst, 1, PgBuckets(store, rate, burst))
    return CallerLimits(rate, burst, 1, SharedBuckets(Path(store), rate, burst))


def worker(path: str, seconds: float, rate: float, burst: int, shared: bool) -> None:
    """One replica: say ready, read the start time, admit as fast as possible until it is over, print the count."""
    lim = _limits(path, rate, burst, shared)
    print("ready", flush=True)
    at = float(sys.stdin.readline())
    time.sleep(max(0.0, at - time.time()))
    admitted, t0 = 0, time.time()
    while time.time() < at + seconds:
        admitted += lim.admit(KEY) is None
    print(json.dumps({"admitted": admitted, "start": t0, "end": time.time()}), flush=True)
    lim.close()


def overshoot(path: Path | str, shared: bool, seconds: float = 2.0, rate: float = 20.0, burst: int = 5) -> dict:
    """Two replica processes on one key: what they admitted together against the key's limit for their span."""
    cmd = [sys.executable, "-m", "benchmarks.limits", "--worker", str(path), str(seconds), str(rate), str(burst)]
    procs = [
        subprocess.Popen(
            [*cmd, "1" if shared else "0"], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        if [p.stdout.readline().strip() for p in procs] != ["ready", "ready"]:
            raise RuntimeError("a replica process did not start")
        at = time.time() + 0.5  # both are past their imports: they start together
        for p in procs:
            p.stdin.write(f"{at}\n")
            p.stdin.flush()
        runs = [json.loads(p.communicate(timeout=seconds + 60)[0]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    span = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    limit = burst + rate * span
    admitted = sum(r["admitted"] for r in runs)
    return {
        "admitted": [r["admitted"] for r in runs],
        "limit": round(limit, 1),
        "span_s": round(span, 3),
        "rate_limit_overshoot": round(admitted / limit, 3),
    }


def admit_latency(path: Path | str, shared: bool, n: int = 5000) -> dict:
    lim = _limits(str(path), 1e9, 10**9, shared)  # never empty: every check is a full refill-and-take
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        lim.admit(f"{KEY}-{i % 100}")
        times.append((time.perf_counter() - t0) * 1e6)
    lim.close()
    times.sort()
    return {"p50": round(times[n // 2], 1), "p99": round(times[int(n * 0.99)], 1)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        path, seconds, rate, burst, shared = sys.argv[2:7]
        worker(path, float(seconds), float(rate), int(burst), shared == "1")
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--burst", type=int, default=5)
    ap.add_argument("--postgres", action="store_true", help="Also measure PgBuckets on a local PostgreSQL.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict = {"seconds": args.seconds, "rate": args.rate, "burst": args.burst}
    with tempfile.TemporaryDirectory(prefix="flywheel-limits-") as d:
        targets = {"local": str(Path(d) / "local.sqlite"), "shared": str(Path(d) / "shared.sqlite")}
        settings = None
        if args.postgres:  # a local PostgreSQL of its own (infra/postgres.py), on a free port
            from feedback.settings import Settings
            from infra import postgres
            from infra.ports import free_port

            settings = Settings(home=Path(d) / "home", db_port=free_port())
            targets["postgres"] = postgres.start(settings).url
        try:
            for mode, target in targets.items():  # the baseline first, then the product's stores, in the same run
                out[mode] = overshoot(target, mode != "local", args.seconds, args.rate, args.burst)
                latency_target = target if mode == "postgres" else str(Path(d) / f"{mode}-latency.sqlite")
                out[mode]["admit_us"] = admit_latency(latency_target, mode != "local")
        finally:
            if settings is not None:
                postgres.destroy(settings)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    if args.json:
        print(json.dumps(out))
        return
    for mode in ("local", "shared", "postgres"):
        if mode not in out:
            continue
        r = out[mode]
        print(
            f"{mode:6}  admitted {sum(r['admitted'])} for a limit of {r['limit']} over {r['span_s']} s: "
            f"overshoot x{r['rate_limit_overshoot']}; one check p50 {r['admit_us']['p50']} us, "
            f"p99 {r['admit_us']['p99']} us"
        )


if __name__ == "__main__":
    main()
