"""How many threads a llama.cpp step should compute on: one step's time at one thread and at all cores, and
streams served with small steps on one thread (the engine's choice) against every step on all cores, idle and
beside a busy process (a torch matmul loop on every core, as a training run beside the app), in one run.

    python -m benchmarks.threads [--users 1,4] [--tokens 32] [--rounds 3] [--json]

Runs under ``OMP_WAIT_POLICY=PASSIVE`` (the stack's setting, ``cli/main.py``) unless the environment says
otherwise. Results: ``benchmarks/results/threads.json``. ``steps_ms``: median milliseconds of one step
(``decodeN``: N rows of one token each over 200 tokens of context; ``prefillN``: an N-token prompt chunk;
``d4+p64``: both) at ``@1`` and ``@all`` threads. ``streams``: per user count and condition, the median seconds
per answer and tokens/s per stream for ``small_on_one`` (the engine's choice) and ``all_on_all`` (the baseline).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before llama.cpp or torch start their OpenMP runtime

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "threads.json"
MODEL = REPO / ".flywheel" / "models" / "base"
BUSY = "import torch,time\na=torch.randn(768,768)\nwhile True: a@a"


def step_times(reps: int = 6) -> dict[str, float]:
    from app.backends.gguf import ensure_gguf
    from app.backends.llamacpp import Engine

    cores = len(os.sched_getaffinity(0))
    out: dict[str, float] = {}
    for label, threads in (("1", 1), ("all", cores)):
        e = Engine(ensure_gguf(MODEL, "f16"), 2048 * 9, 9, 512 + 8, threads, threads)
        for name, rows, pre in (
            ("decode1", 1, 0),
            ("decode4", 4, 0),
            ("decode8", 8, 0),
            ("prefill64", 0, 64),
            ("prefill256", 0, 256),
            ("d4+p64", 4, 64),
        ):
            ts = []
            for _ in range(reps):
                e.forget()
                for s in range(max(rows, 1)):
                    e.decode([(s, [100 + i % 50 for i in range(200)], 0, False)])
                parts = [(s, [5], 200, True) for s in range(rows)]
                if pre:
                    parts.append((8, [7 + i % 90 for i in range(pre)], 0, True))
                t = time.perf_counter()
                e.decode(parts)
                ts.append(time.perf_counter() - t)
            out[f"{name}@{label}"] = round(statistics.median(ts[1:]) * 1000, 1)
        e.close()
    return out


async def _answer(backend, i: int, tokens: int) -> float:
    from app.backends.base import Sampling

    t = time.perf_counter()
    msgs = [{"role": "user", "content": f"Tell me a story about a cat, number {i}."}]
    async for _ in backend.stream(msgs, Sampling(max_new_tokens=tokens, temperature=0.0), cache_scope=f"u{i}"):
        pass
    return time.perf_counter() - t


async def _round(backend, users: int, tokens: int) -> list[float]:
    return list(await asyncio.gather(*(_answer(backend, i, tokens) for i in range(users))))


def streams(users: list[int], tokens: int, rounds: int) -> dict:
    from app.backends.llamacpp import LlamaCppBackend

    cores = len(os.sched_getaffinity(0))
    arms = {
        "small_on_one": LlamaCppBackend(MODEL, max_concurrency=8, max_queue=8, small_step_threads=1),
        "all_on_all": LlamaCppBackend(MODEL, max_concurrency=8, max_queue=8, small_step_threads=cores),
    }
    out: dict = {}
    try:
        for condition in ("idle", "beside_busy_process"):
            busy = None
            if condition != "idle":
                env = {**os.environ, "OMP_NUM_THREADS": str(cores)}
                busy = subprocess.Popen([sys.executable, "-c", BUSY], env=env)
                time.sleep(3)
            try:
                for n in users:
                    times: dict[str, list[float]] = {a: [] for a in arms}
                    for _ in range(rounds):  # the arms take turns, so drift in the machine's load hits both
                        for arm, b in arms.items():
                            times[arm] += asyncio.run(_round(b, n, tokens))
                    out[f"{condition}/users={n}"] = {
                        arm: {
                            "answer_s_p50": round(statistics.median(ts), 3),
                            "tokens_per_s_per_stream": round(tokens / statistics.median(ts), 1),
                        }
                        for arm, ts in times.items()
                    }
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    finally:
        for b in arms.values():
            asyncio.run(b.aclose())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", default="1,4")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = {
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cores": len(os.sched_getaffinity(0)),
        "tokens": args.tokens,
        "steps_ms": step_times(),
        "streams": streams([int(u) for u in args.users.split(",")], args.tokens, args.rounds),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"one step, ms ({res['cores']} cores, OMP_WAIT_POLICY={res['omp_wait_policy']}):")
    for k, v in res["steps_ms"].items():
        print(f"  {k:<16} {v:>8}")
    print(f"streams of {args.tokens} tokens, tokens/s per stream (small steps on one thread | every step on all):")
    for k, v in res["streams"].items():
        a, b = v["small_on_one"]["tokens_per_s_per_stream"], v["all_on_all"]["tokens_per_s_per_stream"]
        print(f"  {k:<28} {a:>7} | {b:>7}")


if __name__ == "__main__":
    main()
