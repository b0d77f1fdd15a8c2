"""Serving benchmark: N concurrent chat users against the real API (or the embedded backend directly).

    python -m benchmarks.serve --users 1,4,8 --json
    python -m benchmarks.serve --users 1,8 --tokens 64 --requests-per-user 3 --target backend

Each simulated user sends ``--requests-per-user`` requests one after another (fixed prompts, greedy,
``--tokens`` new tokens at most); all N users start together. Per N it reports TTFT p50/p99, tokens/s per user
(a user's tokens over the time its requests took, TTFT included) and tokens/s in total (all tokens over the
wall time of the run). In the same run it measures:

- ``roofline_tokens_per_s``: memory bandwidth (best of several large tensor copies, read + write bytes) divided
  by the bytes of weights one decode step reads (parameters x bytes per parameter): the single-stream ceiling
  of a memory-bound decoder.
- ``baseline_tokens_per_s``: a bare ``model.generate`` loop, one stream, same prompt and token count.

``--target auto`` (default) drives the project's HTTP API (``app.server``, started as a subprocess with its own
temporary FLYWHEEL_HOME, streaming ``/v1/chat/completions``) when it exists, else the ``EmbeddedBackend`` in
this process; the JSON says which (``"target": "api" | "backend"``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The same OpenMP policy the embedded backend sets (see app/backends/embedded.py), so the generate baseline and
# the served numbers run under the same conditions; the API subprocess inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from feedback.events import Sampling  # noqa: E402
from feedback.settings import get_settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [  # long answers, so greedy runs reach the token budget instead of stopping early
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a steam engine works.",
    "Describe a walk through a busy market in a big city.",
    "Write a detailed guide to planting a vegetable garden.",
]


@dataclass
class Result:
    ttft_s: float
    total_s: float
    tokens: int


def memory_bandwidth_gb_s(mib: int = 256, repeats: int = 5) -> float:
    a = torch.randn(mib * 1024 * 1024 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * a.element_size() / best / 1e9


def roofline_and_baseline(model_path: Path, tokens: int, repeats: int = 2) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())  # tied embeddings count once: read once per token
    bytes_per_token = params * 4
    bw = memory_bandwidth_gb_s()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    best = float("inf")
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            best = min(best, time.perf_counter() - t)
    del model
    gc.collect()
    return {
        "memory_bandwidth_gb_s": round(bw, 2),
        "params": params,
        "roofline_tokens_per_s": round(bw * 1e9 / bytes_per_token, 1),
        "baseline_tokens_per_s": round(tokens / best, 1),
    }


# ---- targets: one request -> Result ----


class BackendTarget:
    name = "backend"

    def __init__(self, model_path: Path, max_concurrency: int):
        from app.backends.embedded import EmbeddedBackend

        self.backend = EmbeddedBackend(model_path, max_concurrency=max_concurrency, max_queue=64)

    async def request(self, prompt: str, tokens: int) -> Result:
        t0 = time.perf_counter()
        ttft = None
        n = 0
        async for chunk in self.backend.stream(
            [{"role": "user", "content": prompt}], Sampling(temperature=0.0, max_new_tokens=tokens)
        ):
            if ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.finish_reason:
                n = chunk.completion_tokens or 0
        return Result(ttft or 0.0, time.perf_counter() - t0, n)

    async def close(self) -> None:
        await self.backend.aclose()


class ApiTarget:
    """``python -m app.server`` in a subprocess with a throwaway home; Kafka is pointed at a closed port, so
    events go to the server's spool and the benchmark measures serving only."""

    name = "api"

    def __init__(self, model_path: Path, max_concurrency: int):
        import httpx

        self.home = tempfile.TemporaryDirectory(prefix="flywheel-bench-")
        home = Path(self.home.name)
        port, dead_kafka = _free_port(), _free_port()
        (home / "backends.yaml").write_text(
            json.dumps(
                {
                    "base": {
                        "kind": "embedded",
                        "path": str(model_path),
                        "max_concurrency": max_concurrency,
                        "max_queue": 64,
                    }
                }
            )
        )
        env = {
            **os.environ,
            "FLYWHEEL_HOME": str(home),
            "FLYWHEEL_APP_PORT": str(port),
            "FLYWHEEL_APP_HOST": "127.0.0.1",
            "FLYWHEEL_BASE_MODEL": str(model_path),
            "FLYWHEEL_KAFKA_BOOTSTRAP": f"127.0.0.1:{dead_kafka}",
            "PYTHONPATH": str(REPO),
        }
        self.log = (home / "server.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.server"], cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.server exited: {(home / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("app.server did not become healthy in 180 s")
            time.sleep(0.5)
        self.client = httpx.AsyncClient(
            base_url=self.url, timeout=300, limits=httpx.Limits(max_connections=256, max_keepalive_connections=256)
        )

    async def request(self, prompt: str, tokens: int, user: str = "bench") -> Result:
        body = {
            "model": "base",
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": tokens,
            "temperature": 0.0,
            "user": user,
            "messages": [{"role": "user", "content": prompt}],
        }
        t0 = time.perf_counter()
        ttft = None
        n = 0
        async with self.client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                if ttft is None and any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                    ttft = time.perf_counter() - t0
                if event.get("usage"):
                    n = event["usage"]["completion_tokens"]
        return Result(ttft or 0.0, time.perf_counter() - t0, n)

    async def close(self) -> None:
        await self.client.aclose()
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        self.home.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def run_users(target, users: int, requests_per_user: int, tokens: int) -> dict[str, float]:
    async def user(u: int) -> list[Result]:
        out = []
        for i in range(requests_per_user):
            out.append(await target.request(PROMPTS[(u + i) % len(PROMPTS)], tokens))
        return out

    t0 = time.perf_counter()
    per_user = await asyncio.gather(*(user(u) for u in range(users)))
    wall = time.perf_counter() - t0
    flat = [r for rs in per_user for r in rs]
    ttfts = [r.ttft_s * 1000 for r in flat]
    return {
        "users": users,
        "requests": len(flat),
        "mean_completion_tokens": round(statistics.mean(r.tokens for r in flat), 1),
        "ttft_p50_ms": round(_pct(ttfts, 0.5), 1),
        "ttft_p99_ms": round(_pct(ttfts, 0.99), 1),
        "tokens_per_s_per_user": round(
            statistics.mean(sum(r.tokens for r in rs) / sum(r.total_s for r in rs) for rs in per_user), 1
        ),
        "tokens_per_s_total": round(sum(r.tokens for r in flat) / wall, 1),
    }


async def bench(args: argparse.Namespace) -> dict:
    model_path = Path(args.model)
    users = [int(u) for u in args.users.split(",")]
    report: dict = {
        "model": str(model_path),
        "tokens": args.tokens,
        "requests_per_user": args.requests_per_user,
        "cpu_threads": len(os.sched_getaffinity(0)),
        "device": "cpu",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }
    report.update(roofline_and_baseline(model_path, args.tokens))
    target_name = args.target
    if target_name == "auto":
        target_name = "api" if (REPO / "app" / "server.py").exists() else "backend"
    target = (ApiTarget if target_name == "api" else BackendTarget)(model_path, max(users))
    report["target"] = target.name
    try:
        await target.request(PROMPTS[0], 8)  # warm-up: first-call setup out of the numbers
        report["results"] = [await run_users(target, n, args.requests_per_user, args.tokens) for n in users]
    finally:
        await target.close()
    by_n = {r["users"]: r for r in report["results"]}
    checks = {}
    if 1 in by_n:
        one = by_n[1]
        checks["one_user_vs_roofline"] = round(one["tokens_per_s_total"] / report["roofline_tokens_per_s"], 2)
        checks["ttft_p50_ms_one_user_under_200"] = one["ttft_p50_ms"] < 200
        if 8 in by_n:
            checks["eight_users_total_vs_one_user"] = round(
                by_n[8]["tokens_per_s_total"] / one["tokens_per_s_total"], 2
            )
    report["checks"] = checks
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", default="1,4,8", help="comma-separated numbers of concurrent users")
    p.add_argument("--tokens", type=int, default=64, help="max new tokens per request (greedy)")
    p.add_argument("--requests-per-user", type=int, default=3, help="requests each user sends in turn")
    p.add_argument(
        "--target",
        choices=["auto", "api", "backend"],
        default="auto",
        help="api: the HTTP server (app.server); backend: EmbeddedBackend in-process",
    )
    p.add_argument("--model", default=str(get_settings().base_model_path), help="model directory")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    report = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"target={report['target']}  model={report['model']}  tokens={report['tokens']}  "
        f"requests/user={report['requests_per_user']}"
    )
    print(
        f"memory bandwidth {report['memory_bandwidth_gb_s']} GB/s -> roofline "
        f"{report['roofline_tokens_per_s']} tok/s; bare generate baseline {report['baseline_tokens_per_s']} tok/s"
    )
    cols = [
        "users",
        "requests",
        "mean_completion_tokens",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "tokens_per_s_per_user",
        "tokens_per_s_total",
    ]
    print("  ".join(f"{c:>22}" for c in cols))
    for r in report["results"]:
        print("  ".join(f"{r[c]:>22}" for c in cols))
    print("checks:", report["checks"])


if __name__ == "__main__":
    main()
