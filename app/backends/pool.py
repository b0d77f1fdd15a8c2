"""Several model servers serving one version (``FLYWHEEL_MODEL_SERVERS_PER_VERSION``): each answer goes to the least
loaded one, and a server that refuses or cannot be reached before the answer began is skipped for the next, so
losing a server costs nothing but the answers it was streaming (those end with an error, never a hang)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from app.backends.base import MODEL_SERVER_TOKEN_ENV, Busy, Chunk
from app.backends.remote import RemoteBackend
from feedback.events import Sampling


class ServerPool:
    """``api_key`` defaults to ``FLYWHEEL_MODEL_SERVER_TOKEN``, which a server listening off loopback requires."""

    def __init__(
        self,
        urls: list[str],
        model: str | None = None,
        max_concurrency: int = 32,
        timeout: float = 120.0,
        api_key: str | None = None,
    ):
        if not urls:
            raise ValueError("a server pool needs at least one url")
        self.urls = list(urls)
        api_key = api_key or os.environ.get(MODEL_SERVER_TOKEN_ENV) or None
        self.members = [
            RemoteBackend(u, model=model, max_concurrency=max_concurrency, timeout=timeout, api_key=api_key)
            for u in urls
        ]
        self.name = f"pool:{','.join(urls)}"
        self._turn = 0  # equal loads take turns

    def load(self) -> float:
        return min(m.load() for m in self.members)

    async def stream(
        self,
        messages: list[dict[str, str]],
        sampling: Sampling,
        cache_scope: str | None = None,
        party: str | None = None,
    ) -> AsyncIterator[Chunk]:
        refusals = []
        self._turn += 1
        n = len(self.members)
        order = sorted(range(n), key=lambda i: (self.members[i].load(), (i - self._turn) % n))
        for member in (self.members[i] for i in order):
            inner = member.stream(messages, sampling, cache_scope=cache_scope, party=party)
            try:
                first = await anext(inner)
            except Busy as e:  # full, or gone: the next server may answer
                refusals.append(str(e))
                await inner.aclose()
                continue
            except StopAsyncIteration:
                return
            try:
                yield first
                async for chunk in inner:
                    yield chunk
            finally:
                await inner.aclose()
            return
        raise Busy("; ".join(refusals))

    async def aclose(self) -> None:
        for m in self.members:
            await m.aclose()
