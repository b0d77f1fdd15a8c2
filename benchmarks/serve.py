"""Serving benchmark: N concurrent chat users against the real API (or an in-process backend), beside the peer.

    python -m benchmarks.serve --users 1,8 --json                      # the served engine, its peer, quality
    python -m benchmarks.serve --engine transformers --users 1,8        # the fp32 reference engine
    python -m benchmarks.serve --users 1,8 --no-peer --no-quality       # serving numbers only

Each simulated user sends ``--requests-per-user`` requests one after another (fixed prompts, greedy,
``--tokens`` new tokens at most); all N users start together. Per N it reports TTFT p50/p99, tokens/s per user
(a user's tokens over the time its requests took, TTFT included) and tokens/s in total (all tokens over the
wall time of the run). In the same run it measures:

- ``roofline_tokens_per_s``: memory bandwidth (best of several large tensor copies, read + write bytes) divided
  by the bytes one decode step reads at the precision served (every weight tensor once, plus the KV cache of a
  typical prompt): the single-stream ceiling of a memory-bound decoder.
- ``baseline_tokens_per_s``: a bare transformers ``model.generate`` loop in fp32, one stream, same prompt.
- ``peer_tokens_per_s`` / ``peer_ttft_p50_ms``: llama.cpp itself (llama-cpp-python's own ``Llama.generate``
  loop, one stream) on the same GGUF file, same prompts and token budget, same run. It runs in the benchmark's
  own environment (``~/.cache/flywheel-bench/venv``, built from the PyPI sdist on first use, ~6 min on 2 cores),
  never the project's.
- ``peer_server``: llama.cpp's own HTTP server (``llama-server``, continuous batching, prompt cache on), built
  from the same sdist's vendored source (~15 min once), on the same GGUF, driven by the same client, users and
  prompts as our API: the like-for-like peer at every N (``users_N_vs_peer_server`` in ``checks``).
- ``quality``: held-out perplexity (``benchmarks/data/heldout.jsonl``, answers given their prompts) of each
  precision measured and of transformers fp32, and greedy agreement with transformers fp32 (32 tokens per
  held-out prompt: the share of prompts whose continuation is identical, and the mean shared prefix).
- ``stall``: while ``--stall-users`` streams decode, one ``--stall-prompt-tokens`` prompt joins; the longest
  gap between two tokens of the running streams, against their median gap (issue 20's target: 250 ms), and the
  prompt's first token against the same prompt's alone, first in the same run (target: at most 2x).

``--target auto`` (default) drives the project's HTTP API (``app.server``, started as a subprocess with its own
temporary FLYWHEEL_HOME, streaming ``/v1/chat/completions``) when it exists, else the backend in this process; the
JSON says which (``"target": "api" | "backend"``). Load averages at start and end are recorded: the machine is
shared, so compare numbers only within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# OpenMP's wait policy is read once per process, by whichever OpenMP runtime loads first (torch's libgomp and
# llama.cpp's share one soname, so they share one runtime). This process runs what it measures (the in-process
# target) under the policy that engine is served with: llama.cpp under the caller's settings (the default spins
# briefly at barriers; PASSIVE cost 3x, 18 instead of 56 tokens/s), transformers under the PASSIVE its backend
# sets (app/backends/embedded.py). So torch is imported only inside the functions below, after `main` decided.
from feedback.events import Sampling
from feedback.settings import get_settings
from infra import procs
from infra.ports import free_port as _free_port

REPO = Path(__file__).resolve().parents[1]
HELDOUT = REPO / "benchmarks" / "data" / "heldout.jsonl"
PEER_HOME = Path(os.environ.get("FLYWHEEL_BENCH_CACHE", Path.home() / ".cache" / "flywheel-bench"))
PEER_PACKAGE = "llama-cpp-python==0.3.36"
PROMPTS = [  # long answers, so greedy runs reach the token budget instead of stopping early
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a steam engine works.",
    "Describe a walk through a busy market in a big city.",
    "Write a detailed guide to planting a vegetable garden.",
]
LONG_PROMPT_UNIT = "Here is one more paragraph of background that the assistant should read carefully. "


def as_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def long_conversation(prompt_tokens: int, units_per_message: int = 40) -> list[dict[str, str]]:
    """About ``prompt_tokens`` of context as a conversation, each message within the API's per-message limit
    (one message may hold half the window), ending with the user's turn."""
    n = max(1, prompt_tokens // 16)
    sizes = [min(units_per_message, n - i) for i in range(0, n, units_per_message)]
    if len(sizes) % 2 == 0:
        sizes.insert(0, 1)
    roles = ["user" if (len(sizes) - 1 - i) % 2 == 0 else "assistant" for i in range(len(sizes))]
    return [{"role": r, "content": LONG_PROMPT_UNIT * k} for r, k in zip(roles, sizes, strict=True)]


def progress(msg: str) -> None:
    print(f"[serve-bench] {msg}", file=sys.stderr, flush=True)


@dataclass
class Result:
    ttft_s: float
    total_s: float
    tokens: int
    gaps_s: list[float] = field(default_factory=list)


def memory_bandwidth_gb_s(mib: int = 256, repeats: int = 5) -> float:
    import torch

    a = torch.randn(mib * 1024 * 1024 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * a.element_size() / best / 1e9


def chat_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def weight_bytes(model_path: Path, engine: str, precision: str) -> int:
    """Bytes of weights one decode step reads: the GGUF tensors as stored, or fp32 parameters (tied once)."""
    if engine == "llama.cpp":
        from gguf import GGUFReader

        from app.backends.gguf import ensure_gguf

        return int(sum(t.n_bytes for t in GGUFReader(ensure_gguf(model_path, precision)).tensors))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return 4 * sum(p.numel() for p in model.parameters())


def kv_bytes_per_token(model_path: Path, engine: str) -> int:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return c.num_hidden_layers * 2 * kv_heads * head * (2 if engine == "llama.cpp" else 4)  # f16 / fp32 cache


def generate_baseline(model_path: Path, tokens: int, repeats: int = 2) -> float:
    """Tokens/s of a bare fp32 ``model.generate``, one stream: the transformers reference, same prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = torch.tensor([chat_ids(tok, PROMPTS[0])])
    best = float("inf")
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            best = min(best, time.perf_counter() - t)
    del model
    gc.collect()
    return round(tokens / best, 1)


# ---- quality: held-out perplexity and greedy agreement against transformers fp32 ----


def heldout() -> list[dict[str, str]]:
    return [json.loads(line) for line in HELDOUT.read_text().splitlines() if line.strip()]


def heldout_sequences(tokenizer) -> list[tuple[list[int], int]]:
    """(prompt + answer ids, index of the answer's first token) per held-out pair."""
    out = []
    for row in heldout():
        prompt = chat_ids(tokenizer, row["prompt"])
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["answer"]}]
        )
        full = list(full["input_ids"] if hasattr(full, "keys") else full)
        assert full[: len(prompt)] == prompt, "the chat template must extend the prompt"
        out.append((full, len(prompt)))
    return out


def transformers_reference(model_path: Path, new_tokens: int) -> tuple[float, list[list[int]]]:
    """fp32 perplexity on the held-out answers and greedy continuations of the held-out prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    greedy = []
    with torch.inference_mode():
        for ids, start in heldout_sequences(tok):
            logits = model(input_ids=torch.tensor([ids])).logits[0, start - 1 : -1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[start:]), reduction="sum"))
            count += len(ids) - start
        for row in heldout():
            prompt = torch.tensor([chat_ids(tok, row["prompt"])])
            out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
            greedy.append(out[0, prompt.shape[1] :].tolist())
    del model
    gc.collect()
    return math.exp(nll / count), greedy


def quality(model_path: Path, precisions: list[str], new_tokens: int = 32) -> dict:
    from transformers import AutoTokenizer

    from app.backends.batching import stop_ids
    from app.backends.gguf import ensure_gguf
    from app.backends.llamacpp_quality import greedy, score

    progress("quality: transformers fp32 reference (perplexity, greedy) ...")
    ref_ppl, ref_greedy = transformers_reference(model_path, new_tokens)
    tok = AutoTokenizer.from_pretrained(model_path)
    seqs = heldout_sequences(tok)
    prompts = [chat_ids(tok, row["prompt"]) for row in heldout()]
    stop = set(stop_ids(tok, json.loads((model_path / "generation_config.json").read_text()).get("eos_token_id")))
    ref_greedy = [t[: next((i for i, x in enumerate(t) if x in stop), len(t))] for t in ref_greedy]
    out: dict = {"heldout_pairs": len(seqs), "heldout_answer_tokens": sum(len(i) - s for i, s in seqs)}
    out["transformers_fp32"] = {"perplexity": round(ref_ppl, 4)}
    for precision in precisions:
        progress(f"quality: llama.cpp {precision} ...")
        gguf = ensure_gguf(model_path, precision)
        nll, count = score(gguf, seqs)
        got = greedy(gguf, prompts, new_tokens, stop)
        out[f"llama.cpp_{precision}"] = {
            "perplexity": round(math.exp(nll / count), 4),
            "perplexity_vs_fp32": round(math.exp(nll / count) / ref_ppl, 4),
            **agreement(got, ref_greedy),
        }
    return out


def agreement(got: list[list[int]], ref: list[list[int]]) -> dict[str, float]:
    same = sum(a == b for a, b in zip(got, ref, strict=True))
    prefix = []
    for a, b in zip(got, ref, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(b), 1))
    return {"greedy_identical": round(same / len(ref), 3), "greedy_prefix_agreement": round(statistics.mean(prefix), 3)}


# ---- the peer: llama.cpp's own generate loop, in the benchmark's own environment ----

PEER_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
job = json.load(sys.stdin)
llm = Llama(model_path=job["gguf"], n_ctx=2048, n_batch=512, n_threads=job["threads"], verbose=False)
stop = set(job["stop"])
def one(ids):
    t0 = time.perf_counter(); ttft = None; n = 0
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if ttft is None:
            ttft = time.perf_counter() - t0
        if tok in stop:
            break
        n += 1
        if n >= job["tokens"]:
            break
    return ttft, time.perf_counter() - t0, n
one(job["prompts"][0][:8])  # warm-up
out = [one(ids) for ids in job["prompts"]]
print(json.dumps(out))
"""


def peer_python() -> Path:
    """The benchmark-owned venv with llama-cpp-python built from its PyPI sdist (built here on first use)."""
    py = PEER_HOME / "venv" / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return py
    progress(f"building the peer ({PEER_PACKAGE} from its sdist) in {PEER_HOME}/venv: ~6 min on 2 idle cores ...")
    PEER_HOME.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", PEER_HOME / "venv"], check=True)
    wheels = PEER_HOME / "wheels"
    wheels.mkdir(exist_ok=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(len(os.sched_getaffinity(0)))}
    pip = [py, "-m", "pip", "install", "--no-binary", "llama-cpp-python", "--find-links", wheels, PEER_PACKAGE]
    done = subprocess.run(pip, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"could not build {PEER_PACKAGE}: {(done.stderr or done.stdout)[-2000:]}")
    return py


def run_peer(model_path: Path, precision: str, tokens: int, requests: int) -> dict:
    from transformers import AutoTokenizer

    from app.backends.batching import stop_ids
    from app.backends.gguf import ensure_gguf

    tok = AutoTokenizer.from_pretrained(model_path)
    eos = json.loads((model_path / "generation_config.json").read_text()).get("eos_token_id")
    job = {
        "gguf": str(ensure_gguf(model_path, precision)),
        "threads": len(os.sched_getaffinity(0)),
        "tokens": tokens,
        "stop": stop_ids(tok, eos),
        "prompts": [chat_ids(tok, PROMPTS[i % len(PROMPTS)]) for i in range(requests)],
    }
    done = subprocess.run(
        [peer_python(), "-c", PEER_SCRIPT],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the peer failed: {done.stderr[-2000:]}")
    runs = [Result(ttft, total, n) for ttft, total, n in json.loads(done.stdout.strip().splitlines()[-1])]
    return {
        "peer": f"{PEER_PACKAGE} Llama.generate, one stream, {precision}",
        "peer_tokens_per_s": round(sum(r.tokens for r in runs) / sum(r.total_s for r in runs), 1),
        "peer_ttft_p50_ms": round(_pct([r.ttft_s * 1000 for r in runs], 0.5), 1),
        "peer_mean_completion_tokens": round(statistics.mean(r.tokens for r in runs), 1),
    }


# ---- targets: one request -> Result ----


def backend_spec(model_path: Path, engine: str, precision: str, max_concurrency: int) -> dict:
    spec = {"kind": "embedded", "path": str(model_path), "engine": engine, "max_concurrency": max_concurrency}
    spec["max_queue"] = 64
    if engine == "llama.cpp":
        spec["precision"] = precision
    return spec


class BackendTarget:
    name = "backend"

    def __init__(self, spec: dict):
        from app.backends.registry import build_backend

        self.backend = build_backend(spec)

    async def request(self, prompt: str | list[dict[str, str]], tokens: int, user: str = "bench") -> Result:
        t0 = time.perf_counter()
        ttft = None
        n = 0
        stamps = []
        sampling = Sampling(temperature=0.0, max_new_tokens=tokens)
        async for chunk in self.backend.stream(as_messages(prompt), sampling, cache_scope=user):
            stamps.append(time.perf_counter())
            if ttft is None:
                ttft = stamps[-1] - t0
            if chunk.finish_reason:
                n = chunk.completion_tokens or 0
        return Result(ttft or 0.0, time.perf_counter() - t0, n, _gaps(stamps))

    async def close(self) -> None:
        await self.backend.aclose()


class ApiTarget:
    """``python -m app.server`` in a subprocess with a throwaway home; Kafka is pointed at a closed port, so
    events go to the server's spool and the benchmark measures serving only."""

    name = "api"
    model = "base"

    def __init__(self, spec: dict):

        self.home = tempfile.TemporaryDirectory(prefix="flywheel-bench-")
        home = Path(self.home.name)
        port, dead_kafka = _free_port(), _free_port()
        (home / "backends.yaml").write_text(json.dumps({"base": spec}))
        env = {
            **os.environ,
            "FLYWHEEL_HOME": str(home),
            "FLYWHEEL_APP_PORT": str(port),
            "FLYWHEEL_APP_HOST": "127.0.0.1",
            "FLYWHEEL_BASE_MODEL": spec["path"],
            "FLYWHEEL_KAFKA_BOOTSTRAP": f"127.0.0.1:{dead_kafka}",
            "FLYWHEEL_API_STREAMS_PER_KEY": "1000",  # the benchmark is one client with many users
            "FLYWHEEL_API_RATE_PER_KEY": "1000",
            "FLYWHEEL_API_BURST_PER_KEY": "1000",
            "PYTHONPATH": str(REPO),
        }
        self._launch([sys.executable, "-m", "app.server"], env, port, "/healthz", 300)

    def _launch(self, cmd: list[str], env: dict | None, port: int, health: str, timeout_s: float) -> None:
        """Start ``cmd`` (logging into the throwaway home), wait until ``health`` answers 200, open the client."""
        import httpx

        log_path = Path(self.home.name) / "server.log"
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{Path(cmd[0]).name} exited: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}{health}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} did not become healthy in {timeout_s:.0f} s")
            time.sleep(0.3)
        self.client = httpx.AsyncClient(
            base_url=self.url, timeout=300, limits=httpx.Limits(max_connections=256, max_keepalive_connections=256)
        )

    async def request(self, prompt: str | list[dict[str, str]], tokens: int, user: str = "bench") -> Result:
        import httpx

        try:
            return await self._request(prompt, tokens, user)
        except httpx.RemoteProtocolError:  # a pooled connection the server had closed (llama-server closes a
            return await self._request(prompt, tokens, user)  # keep-alive connection after a few requests)

    async def _request(self, prompt: str | list[dict[str, str]], tokens: int, user: str) -> Result:
        body = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": tokens,
            "temperature": 0.0,
            "user": user,
            "messages": as_messages(prompt),
        }
        t0 = time.perf_counter()
        ttft = None
        n = 0
        stamps = []
        async with self.client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                    stamps.append(time.perf_counter())
                    if ttft is None:
                        ttft = stamps[-1] - t0
                if event.get("usage"):
                    n = event["usage"]["completion_tokens"]
        return Result(ttft or 0.0, time.perf_counter() - t0, n, _gaps(stamps))

    async def close(self) -> None:
        await self.client.aclose()
        procs.end(self.proc, 15)
        self.log.close()
        self.home.cleanup()


class PeerServerTarget(ApiTarget):
    """llama.cpp's own HTTP server (``llama-server``: continuous batching over ``slots`` parallel sequences, prompt
    cache on) on the same GGUF file, driven by the very client that drives our API: the like-for-like peer for
    N users. Built from the vendored source of the same sdist as the loop peer (``peer_server_binary``)."""

    name = "peer_server"
    model = "peer"

    def __init__(self, gguf: Path, slots: int, context_per_slot: int):

        self.home = tempfile.TemporaryDirectory(prefix="flywheel-bench-peer-")
        port = _free_port()
        cmd = [  # llama-server's own defaults otherwise (batch sizes, flash attention, prompt cache)
            str(peer_server_binary()),
            *("-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)),
            *("-t", str(len(os.sched_getaffinity(0))), "-np", str(slots), "-c", str(context_per_slot * slots)),
            *("--no-webui", "--jinja"),
        ]
        self._launch(cmd, None, port, "/health", 120)


def peer_server_binary() -> Path:
    """``llama-server`` built from the llama.cpp source vendored in ``PEER_PACKAGE``'s sdist, with llama.cpp's
    default (native) CPU flags, in the benchmark's own cache (~15 min on 2 idle cores, once)."""
    build = PEER_HOME / "server-build"
    binary = build / "bin" / "llama-server"
    if binary.exists():
        return binary
    progress(f"building llama-server from the {PEER_PACKAGE} sdist in {build}: ~15 min on 2 idle cores ...")
    src = PEER_HOME / "src"
    name, version = PEER_PACKAGE.split("==")
    stem = f"{name.replace('-', '_')}-{version}"
    tree = src / stem
    if not tree.exists():
        src.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", src, PEER_PACKAGE],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            ["tar", "-xzf", next(src.glob(f"{name.replace('-', '_')}-{version}.tar.gz")), "-C", src], check=True
        )
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF"]
    flags += [
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_OPENSSL=OFF",
    ]
    jobs = str(len(os.sched_getaffinity(0)))
    for cmd in (
        ["cmake", "-S", tree / "vendor" / "llama.cpp", "-B", build, *flags],
        ["cmake", "--build", build, "--target", "llama-server", "-j", jobs],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"could not build llama-server: {(done.stderr or done.stdout)[-2000:]}")
    return binary


async def run_peer_server(model_path: Path, precision: str, users: list[int], args: argparse.Namespace) -> dict:
    """The same users, prompts and client against ``llama-server``; one result per N, like ours."""
    from app.backends.gguf import ensure_gguf

    target = PeerServerTarget(ensure_gguf(model_path, precision), max(users), 2048)
    try:
        await target.request(PROMPTS[0], 8)  # warm-up, as for ours
        results = [await run_users(target, n, args.requests_per_user, args.tokens) for n in users]
    finally:
        await target.close()
    return {"peer_server": f"llama-server from {PEER_PACKAGE}, -np {max(users)}, {precision}", "results": results}


def _gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def run_users(target, users: int, requests_per_user: int, tokens: int) -> dict[str, float]:
    async def user(u: int) -> list[Result]:
        out = []
        for i in range(requests_per_user):
            out.append(await target.request(PROMPTS[(u + i) % len(PROMPTS)], tokens, user=f"user-{u}"))
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


async def run_stall(target, users: int, prompt_tokens: int, tokens: int) -> dict[str, float]:
    """``users`` streams decode; one long prompt joins after they started. The running streams' longest gap
    between two tokens, against their median gap, says whether the long prefill froze them.

    Then, with nothing else running, the same reader asks a follow-up (the long conversation, an answer, one more
    question): the served prefix cache should prefill only the new turn. The very same messages from another user
    (nothing reusable for them) give the cold time to first token beside it."""
    long_prompt = long_conversation(prompt_tokens)
    alone = await target.request(long_prompt, 8, user="alone-reader")  # the same prompt with nothing running

    async def joiner() -> Result:
        await asyncio.sleep(0.5)
        return await target.request(long_prompt, 8, user="long-reader")

    running = (target.request(PROMPTS[u % len(PROMPTS)], tokens, user=f"user-{u}") for u in range(users))
    results = await asyncio.gather(*running, joiner())
    gaps = [g * 1000 for r in results[:-1] for g in r.gaps_s]
    followup = [
        *long_prompt,
        {"role": "assistant", "content": "I have read all of it."},
        {"role": "user", "content": "Good. Now summarise it in one sentence."},
    ]
    warm = await target.request(followup, 8, user="long-reader")
    cold = await target.request(followup, 8, user="another-reader")
    return {
        "users": users,
        "long_prompt_chars": sum(len(m["content"]) for m in long_prompt),
        "long_prompt_messages": len(long_prompt),
        "long_prompt_ttft_ms": round(results[-1].ttft_s * 1000, 1),
        "long_prompt_alone_ttft_ms": round(alone.ttft_s * 1000, 1),
        "long_prompt_ttft_ratio": round(results[-1].ttft_s / alone.ttft_s, 2),
        "gap_median_ms": round(statistics.median(gaps), 1) if gaps else None,
        "gap_max_ms": round(max(gaps), 1) if gaps else None,
        "followup_ttft_ms": round(warm.ttft_s * 1000, 1),
        "followup_other_user_ttft_ms": round(cold.ttft_s * 1000, 1),
    }


async def bench(args: argparse.Namespace) -> dict:
    model_path = Path(args.model).resolve()
    users = [int(u) for u in args.users.split(",")]
    engine, precision = args.engine, args.precision if args.engine == "llama.cpp" else "f32"
    report: dict = {
        "model": str(model_path),
        "engine": engine,
        "precision": precision,
        "tokens": args.tokens,
        "requests_per_user": args.requests_per_user,
        "cpu_threads": len(os.sched_getaffinity(0)),
        "device": "cpu",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "default"),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }
    target_name = args.target
    if target_name == "auto":
        target_name = "api" if (REPO / "app" / "server.py").exists() else "backend"
    spec = backend_spec(model_path, engine, precision, max(users + [args.stall_users + 1]))
    progress(f"serving through the {target_name} ({engine}, {precision}) ...")
    target = (ApiTarget if target_name == "api" else BackendTarget)(spec)
    report["target"] = target.name
    try:
        await target.request(PROMPTS[0], 8)  # warm-up: first-call setup out of the numbers
        report["results"] = []
        for n in users:
            progress(f"{n} user(s) ...")
            report["results"].append(await run_users(target, n, args.requests_per_user, args.tokens))
        if args.stall_users:
            progress("a long prompt joins running streams ...")
            report["stall"] = await run_stall(target, args.stall_users, args.stall_prompt_tokens, args.tokens)
    finally:
        await target.close()
    if args.stall_users and args.stall_baseline and engine == "llama.cpp":
        # The same stall with the fixed 64-token chunk every step (the engine before its measured budget), in
        # this run: the machine is shared, so the comparison is side by side.
        progress("the same long prompt, fixed 64-token prefill chunks (baseline) ...")
        fixed_spec = {**spec, "prefill_max": 64, "step_target_s": 1e3}
        fixed = (ApiTarget if target_name == "api" else BackendTarget)(fixed_spec)
        try:
            await fixed.request(PROMPTS[0], 8)
            report["stall_fixed_chunk"] = await run_stall(
                fixed, args.stall_users, args.stall_prompt_tokens, args.tokens
            )
        finally:
            await fixed.close()
    if args.peer and engine == "llama.cpp":
        progress("peer: llama-server, the same users through HTTP ...")
        try:
            report["peer_server"] = await run_peer_server(model_path, precision, users, args)
        except Exception as e:  # noqa: BLE001 - say why in the report, keep our numbers
            report["peer_server_error"] = f"{type(e).__name__}: {e}"
    # After the served numbers: torch computing on this thread first would give libgomp a second team of workers
    # and slow an in-process llama.cpp target (see app/backends/llamacpp.py, _LLAMA_THREAD).
    progress("memory bandwidth and roofline ...")
    bw = memory_bandwidth_gb_s()
    step_bytes = weight_bytes(model_path, engine, precision) + kv_bytes_per_token(model_path, engine) * 100
    report["memory_bandwidth_gb_s"] = round(bw, 2)
    report["bytes_per_token"] = step_bytes
    report["roofline_tokens_per_s"] = round(bw * 1e9 / step_bytes, 1)
    progress("bare transformers generate baseline (fp32) ...")
    report["baseline_tokens_per_s"] = generate_baseline(model_path, args.tokens)
    if args.peer and engine == "llama.cpp":
        progress("peer: llama.cpp generate, one stream ...")
        try:
            report.update(run_peer(model_path, precision, args.tokens, max(3, args.requests_per_user)))
        except Exception as e:  # noqa: BLE001 - say why in the report, keep our numbers
            report["peer_error"] = f"{type(e).__name__}: {e}"
    if args.quality and engine == "llama.cpp":
        report["quality"] = quality(model_path, sorted({"f32", precision}, key=["f32", "f16", "bf16", "q8_0"].index))
    report["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    report["checks"] = checks(report)
    return report


def checks(report: dict) -> dict:
    """The issue's targets, each as measured and met or not."""
    by_n = {r["users"]: r for r in report["results"]}
    out: dict = {}
    one, eight = by_n.get(1), by_n.get(8)
    if one:
        ratio = one["tokens_per_s_total"] / report["roofline_tokens_per_s"]
        out["one_user_vs_roofline"] = {"measured": round(ratio, 2), "target": ">= 0.6", "met": ratio >= 0.6}
        if "peer_tokens_per_s" in report:
            ratio = one["tokens_per_s_total"] / report["peer_tokens_per_s"]
            out["one_user_vs_peer"] = {"measured": round(ratio, 2), "target": ">= 1.0", "met": ratio >= 1.0}
        out["ttft_p50_ms_one_user"] = {
            "measured": one["ttft_p50_ms"],
            "target": "< 150",
            "met": one["ttft_p50_ms"] < 150,
        }
    if one and eight:
        ratio = eight["tokens_per_s_total"] / one["tokens_per_s_total"]
        out["eight_users_total_vs_one_user"] = {"measured": round(ratio, 2), "target": ">= 4", "met": ratio >= 4}
    server = {r["users"]: r for r in report.get("peer_server", {}).get("results", [])}
    for n, ours in ((1, one), (8, eight)):
        if ours and n in server:  # like for like: llama-server through HTTP, the same client and users
            ratio = ours["tokens_per_s_total"] / server[n]["tokens_per_s_total"]
            out[f"users_{n}_vs_peer_server"] = {"measured": round(ratio, 2), "target": ">= 1.0", "met": ratio >= 1.0}
    if eight:
        out["ttft_p50_ms_eight_users"] = {
            "measured": eight["ttft_p50_ms"],
            "target": "< 400",
            "met": eight["ttft_p50_ms"] < 400,
        }
    stall = report.get("stall")
    if stall and stall.get("gap_max_ms") is not None:  # issue 20: a long prompt joining running streams
        gap = stall["gap_max_ms"]
        out["stall_gap_max_ms"] = {"measured": gap, "target": "<= 250", "met": gap <= 250}
        ratio = stall["long_prompt_ttft_ratio"]
        out["long_prompt_ttft_vs_alone"] = {"measured": ratio, "target": "<= 2", "met": ratio <= 2}
    return out


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", default="1,4,8", help="comma-separated numbers of concurrent users")
    p.add_argument("--tokens", type=int, default=64, help="max new tokens per request (greedy)")
    p.add_argument("--requests-per-user", type=int, default=3, help="requests each user sends in turn")
    p.add_argument("--engine", choices=["llama.cpp", "transformers"], default=settings.serve_engine)
    p.add_argument("--precision", choices=["f32", "f16", "bf16", "q8_0"], default=settings.serve_precision)
    p.add_argument(
        "--target",
        choices=["auto", "api", "backend"],
        default="auto",
        help="api: the HTTP server (app.server); backend: the in-process backend",
    )
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip llama.cpp's own loop (the peer)")
    p.add_argument("--no-quality", dest="quality", action="store_false", help="skip perplexity / greedy agreement")
    p.add_argument("--stall-users", type=int, default=4, help="streams running while a long prompt joins (0: skip)")
    p.add_argument("--stall-prompt-tokens", type=int, default=1500, help="about how long the joining prompt is")
    p.add_argument(
        "--no-stall-baseline",
        dest="stall_baseline",
        action="store_false",
        help="skip the stall's baseline (fixed 64-token prefill chunks, the same run)",
    )
    p.add_argument("--model", default=str(settings.base_model_path), help="model directory")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if args.engine == "transformers":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see the top of this file
    report = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"target={report['target']}  engine={report['engine']}  precision={report['precision']}  "
        f"tokens={report['tokens']}  requests/user={report['requests_per_user']}  "
        f"load {report['load_avg_1m_at_start']} -> {report['load_avg_1m_at_end']}"
    )
    print(
        f"memory bandwidth {report['memory_bandwidth_gb_s']} GB/s -> roofline "
        f"{report['roofline_tokens_per_s']} tok/s; transformers generate fp32 {report['baseline_tokens_per_s']} tok/s"
    )
    if "peer_tokens_per_s" in report:
        print(
            f"peer (llama.cpp, one stream): {report['peer_tokens_per_s']} tok/s, TTFT {report['peer_ttft_p50_ms']} ms"
        )
    elif "peer_error" in report:
        print(f"peer: not measured ({report['peer_error']})")
    cols = ["users", "requests", "mean_completion_tokens", "ttft_p50_ms", "ttft_p99_ms"]
    cols += ["tokens_per_s_per_user", "tokens_per_s_total"]
    print("  ".join(f"{c:>22}" for c in cols))
    for r in report["results"]:
        print("  ".join(f"{r[c]:>22}" for c in cols))
    if "peer_server" in report:
        print(f"peer: {report['peer_server']['peer_server']}, the same client")
        for r in report["peer_server"]["results"]:
            print("  ".join(f"{r[c]:>22}" for c in cols))
    elif "peer_server_error" in report:
        print(f"peer server: not measured ({report['peer_server_error']})")
    if "stall" in report:
        print("long prompt joining:", report["stall"])
    if "stall_fixed_chunk" in report:
        print("  with fixed 64-token chunks:", report["stall_fixed_chunk"])
    if "quality" in report:
        print("quality:", json.dumps(report["quality"]))
    for name, c in report["checks"].items():
        print(f"{name:34s} {c['measured']!s:>8} (target {c['target']}): {'met' if c['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
