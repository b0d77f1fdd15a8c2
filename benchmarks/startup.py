"""First start: from ``flywheel up`` to the first chat answer, beside the app alone (its floor) in the same run.

    python -m benchmarks.startup [--rounds 2] [--json]

Each round starts, in a fresh home on free ports with the prepared base model:
- ``stack``: ``flywheel up`` (broker, Prefect, MLflow, ingest, flows, worker, autopilot, app); the clock stops at
  the first 200 from ``POST /v1/chat/completions``, then at "every service up" (Prefect healthy, MLflow answering),
  and the stack is stopped with Ctrl-C (SIGINT), timed too;
- ``app``: ``python -m app.server`` alone (no broker: its events wait in the outbox), to the first answer.
The two alternate, so a busy machine slows both. The target is the stack's first answer under 30 s (issue 19).
Results: ``benchmarks/results/startup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "startup.json"
TARGET_S = 30.0


def env_for(home: Path) -> dict[str, str]:
    """A world of its own (the demo's: fresh ports, the prepared base model) as the stack's environment."""
    from cli.demo_stack import private_settings
    from feedback.settings import Settings

    env = private_settings(home, Settings(base_model=str(REPO / ".flywheel" / "models" / "base"))).child_env(REPO)
    return {k: v for k, v in env.items() if not k.startswith("PREFECT_")}


def answered(url: str) -> bool:
    body = {"model": "flywheel", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    try:
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def until(cond, t0: float, limit_s: float) -> float | None:
    while time.monotonic() - t0 < limit_s:
        if cond():
            return round(time.monotonic() - t0, 1)
        time.sleep(0.25)
    return None


def one(kind: str, limit_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"flywheel-startup-{kind}-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        env = env_for(home)
        url = f"http://127.0.0.1:{env['FLYWHEEL_APP_PORT']}"
        argv = [sys.executable, "-m", "cli.main", "up"] if kind == "stack" else [sys.executable, "-m", "app.server"]
        t0 = time.monotonic()
        with open(Path(tmp) / "out.log", "wb") as log:
            proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            try:
                out = {"kind": kind, "first_answer_s": until(lambda: answered(url), t0, limit_s)}
                if kind == "stack":
                    prefect = f"http://127.0.0.1:{env['FLYWHEEL_PREFECT_PORT']}/api/health"
                    mlflow = f"http://127.0.0.1:{env['FLYWHEEL_MLFLOW_PORT']}/health"
                    out["all_up_s"] = until(lambda: healthy(prefect) and healthy(mlflow), t0, limit_s)
            finally:
                t1 = time.monotonic()
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                out["stop_s"] = round(time.monotonic() - t1, 1)
                if kind == "stack":
                    subprocess.run(
                        [sys.executable, "-m", "cli.main", "down", "--json"],
                        env=env,
                        cwd=REPO,
                        capture_output=True,
                        timeout=120,
                    )
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--limit-s", type=float, default=300.0, help="give up on one start after this long")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    runs = [one(kind, a.limit_s) for _ in range(a.rounds) for kind in ("stack", "app")]
    stack = [r["first_answer_s"] for r in runs if r["kind"] == "stack"]
    app = [r["first_answer_s"] for r in runs if r["kind"] == "app"]
    worst = max((s for s in stack if s is not None), default=None)
    result = {
        "runs": runs,
        "stack_first_answer_s": stack,
        "app_alone_first_answer_s": app,
        "target_s": TARGET_S,
        "met": None not in stack and worst is not None and worst < TARGET_S,
        "load_avg_before": round(load0, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if a.json:
        print(json.dumps(result))
    else:
        print(
            f"stack first answer (s): {stack}   app alone (s): {app}   target < {TARGET_S:.0f} s: "
            f"{'met' if result['met'] else 'not met'}   (load {load0:.1f} -> {result['load_avg_after']})"
        )
        for r in runs:
            print(f"  {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
