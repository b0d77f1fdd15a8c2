"""Generation backends against the real default model (no mocks): streaming, batching, bounds, cancellation.

Every contract test runs on both in-process engines (transformers fp32 and llama.cpp at the default serving
precision), each loaded once per module. The remote test starts the real ``transformers serve`` process.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.backends.base import Busy, Chunk
from app.backends.registry import backend_config, build_backend
from feedback.events import Sampling
from feedback.settings import Settings, get_settings
from tests.app.greedy_ties import assert_same_up_to_ties
from tests.conftest import free_port, need_model

MODEL = get_settings().base_model_path
ENGINES = ["transformers", "llama.cpp"]


@pytest.fixture(autouse=True, scope="module")
def _model_present():
    need_model(MODEL)  # a missing model fails these tests; it never skips them


GREEDY = Sampling(temperature=0.0, max_new_tokens=32)
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "Name three colours of the rainbow.",
]


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def collect(backend, messages, sampling=GREEDY) -> tuple[str, Chunk]:
    parts = []
    async for chunk in backend.stream(messages, sampling):
        parts.append(chunk.text)
        last = chunk
    return "".join(parts), last


@pytest.fixture(scope="module", params=ENGINES)
def embedded(request):
    """One in-process backend per engine; llama.cpp at the default serving precision (its GGUF export is made on
    first load and cached beside the weights)."""
    spec = {"kind": "embedded", "path": str(MODEL), "engine": request.param, "max_concurrency": 4, "max_queue": 1}
    backend = build_backend(spec)
    yield backend
    asyncio.run(backend.aclose())


def test_streams_a_coherent_answer(embedded):
    text, last = asyncio.run(collect(embedded, ask(PROMPTS[0])))
    assert "Paris" in text
    assert last.finish_reason == "stop"
    assert last.prompt_tokens > 10 and 1 <= last.completion_tokens <= GREEDY.max_new_tokens
    assert embedded.load() == 0.0


def _reference_greedy(backend, ids: list[int], n: int) -> list[int]:
    """The engine's own one-sequence greedy loop: ``model.generate`` (transformers) or ``llamacpp_quality.greedy``."""
    if hasattr(backend, "model"):
        import torch

        with torch.inference_mode():
            out = backend.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
        return out[0, len(ids) :].tolist()
    from app.backends.llamacpp_quality import greedy

    return greedy(backend.gguf_path, [ids], n, set(backend._stop_ids))[0]


def test_greedy_matches_the_reference_loop_and_multibyte_text_streams_whole(embedded):
    """Same tokens as the engine's plain greedy loop (up to a near-tie, ``greedy_ties``); characters split over
    several tokens arrive whole."""
    messages = ask("How do you say 'thank you' in Japanese? Answer with the Japanese word only.")
    sampling = Sampling(temperature=0.0, max_new_tokens=24)
    chunks: list[str] = []

    async def run():
        async for c in embedded.stream(messages, sampling):
            chunks.append(c.text)

    asyncio.run(run())
    expected = embedded.tokenizer.decode(
        _reference_greedy(embedded, embedded.encode(messages), 24), skip_special_tokens=True
    )
    assert_same_up_to_ties(embedded, [messages], ["".join(chunks)], [expected])
    assert any(ord(ch) > 0x3000 for ch in expected), expected  # the case under test: multi-byte characters
    assert all("\ufffd" not in c for c in chunks)


def test_batching_does_not_change_greedy_results(embedded):
    alone = [asyncio.run(collect(embedded, ask(p)))[0] for p in PROMPTS]

    async def together():
        return await asyncio.gather(*(collect(embedded, ask(p)) for p in PROMPTS))

    batched = [text for text, _ in asyncio.run(together())]
    assert_same_up_to_ties(embedded, [ask(p) for p in PROMPTS], batched, alone)
    assert all(alone)


def test_staggered_joins_keep_greedy_results(embedded):
    """Requests joining a running batch (different lengths, left padding) still decode as alone: the same answer,
    or one that parts from it only at a near-tie of the model's own logits (``greedy_ties``; CI once saw a joined
    answer end a word short)."""
    alone = [asyncio.run(collect(embedded, ask(p))) for p in PROMPTS[:3]]

    async def staggered():
        async def late(i):
            await asyncio.sleep(0.15 * i)
            return await collect(embedded, ask(PROMPTS[i]))

        return await asyncio.gather(*(late(i) for i in range(3)))

    joined = asyncio.run(staggered())
    assert_same_up_to_ties(embedded, [ask(p) for p in PROMPTS[:3]], [t for t, _ in joined], [t for t, _ in alone])


def test_an_answer_that_parts_where_the_model_is_sure_is_caught(embedded):
    """The near-tie allowance of the tests above catches a real mix-up: "Berlin" for "Paris" is no tie."""
    messages = ask(PROMPTS[0])
    right, _ = asyncio.run(collect(embedded, messages))
    assert "Paris" in right
    with pytest.raises(AssertionError, match="where the model is sure"):
        assert_same_up_to_ties(embedded, [messages], [right.replace("Paris", "Berlin", 1)], [right])
    assert_same_up_to_ties(embedded, [messages], [right], [right])


def test_seeded_sampling_is_reproducible(embedded):
    s = Sampling(temperature=0.9, top_p=0.9, max_new_tokens=16, seed=1234)
    a = asyncio.run(collect(embedded, ask(PROMPTS[1]), s))[0]
    b = asyncio.run(collect(embedded, ask(PROMPTS[1]), s))[0]
    assert a == b and a


def test_busy_past_the_bound_then_the_queue_drains(embedded):
    bound = embedded.max_concurrency + embedded.max_queue
    long = Sampling(temperature=0.0, max_new_tokens=24)

    async def run():
        streams = [embedded.stream(ask(p), long) for p in (PROMPTS * 2)[:bound]]
        firsts = [asyncio.ensure_future(s.__anext__()) for s in streams]
        await asyncio.sleep(0)  # every stream has registered (the last one waits in the queue)
        assert embedded.load() == 1.0
        with pytest.raises(Busy):
            await collect(embedded, ask("one too many"))
        results = []
        for s, first in zip(streams, firsts, strict=True):
            parts = [(await first).text]
            async for c in s:
                parts.append(c.text)
                last = c
            results.append(last)
        assert all(r.finish_reason in ("stop", "length") for r in results)
        assert embedded.load() == 0.0
        text, _ = await collect(embedded, ask(PROMPTS[0]))  # accepted again
        assert "Paris" in text

    asyncio.run(run())


def test_cancelling_frees_the_slot(embedded):
    bound = embedded.max_concurrency + embedded.max_queue
    long = Sampling(temperature=0.0, max_new_tokens=200)

    async def run():
        async def consume(s):
            async for _ in s:
                pass

        streams = [embedded.stream(ask("Tell me a long story about a dragon."), long) for _ in range(bound)]
        firsts = [await s.__anext__() for s in streams[:1]]
        tasks = [asyncio.create_task(consume(s)) for s in streams[1:]]
        await asyncio.sleep(0.3)
        assert firsts and embedded.load() == 1.0
        with pytest.raises(Busy):
            await collect(embedded, ask("over the bound"))
        await streams[0].aclose()  # consumer closes the generator
        tasks[0].cancel()  # consumer task is cancelled
        await asyncio.gather(tasks[0], return_exceptions=True)
        text, last = await collect(embedded, ask(PROMPTS[0]), Sampling(temperature=0.0, max_new_tokens=8))
        assert text and last.finish_reason in ("stop", "length")
        for t in tasks[1:]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert embedded.load() == 0.0
        deadline = time.monotonic() + 10
        while embedded._rows and time.monotonic() < deadline:  # the decode thread drops cancelled rows
            await asyncio.sleep(0.05)
        assert not embedded._rows

    asyncio.run(run())


def test_registry_defaults_to_the_embedded_base_model(tmp_path):
    s = Settings(home=tmp_path, base_model=str(MODEL))
    assert backend_config(s) == {"base": {"kind": "embedded", "path": str(MODEL)}}
    (tmp_path / "backends.yaml").write_text("base: {kind: remote, url: 'http://127.0.0.1:9', model: m}\n")
    assert backend_config(s)["base"]["kind"] == "remote"
    with pytest.raises(ValueError, match="unknown keys"):
        build_backend({"kind": "remote", "url": "http://127.0.0.1:9", "modle": "typo"})


@pytest.mark.integration
@pytest.mark.slow
def test_remote_backend_streams_from_transformers_serve(tmp_path):
    from app.backends.remote import RemoteBackend

    port = free_port()
    cli = Path(sys.executable).parent / "transformers"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(cli), "serve", str(MODEL), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "transformers serve did not come up"
            time.sleep(0.5)

        async def run():
            # The server is pinned to the model it was started with and wants that name in each request.
            backend = RemoteBackend(f"http://127.0.0.1:{port}", model=str(MODEL), max_concurrency=1)
            try:
                chunks = [c async for c in backend.stream(ask(PROMPTS[0]), GREEDY)]
                assert "Paris" in "".join(c.text for c in chunks)
                assert chunks[-1].finish_reason == "stop"
                assert sum(c.finish_reason is not None for c in chunks) == 1
                assert backend.load() == 0.0
                # Closing a stream early frees its slot at once.
                s = backend.stream(ask(PROMPTS[1]), GREEDY)
                await s.__anext__()
                assert backend.load() == 1.0
                with pytest.raises(Busy):
                    await collect(backend, ask("over the bound"))
                await s.aclose()
                assert backend.load() == 0.0
            finally:
                await backend.aclose()

        asyncio.run(run())
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
