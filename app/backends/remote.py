"""Generation on a remote TGI / vLLM / OpenAI-compatible endpoint through ``huggingface_hub``.

``AsyncInferenceClient.chat_completion(stream=True)`` speaks the Messages API that all three serve, so the same
backend covers a GPU box running TGI or vLLM and the ``transformers serve`` process the tests start.
The endpoint batches on its side; this backend only bounds how many streams this app keeps open to it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Literal

from httpx2 import TransportError  # huggingface_hub's HTTP client: refused, reset, unreachable
from huggingface_hub import AsyncInferenceClient
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError

from app.backends.base import Busy, Chunk
from feedback.events import Sampling

log = logging.getLogger(__name__)

_FINISH: dict[str, Literal["stop", "length"]] = {"length": "length", "max_tokens": "length"}


def _context_refusal(e: HfHubHTTPError) -> str | None:
    """The server's sentence when it refused the prompt as longer than the model's context, else None."""
    if e.response is None or e.response.status_code != 400:
        return None
    try:
        err = e.response.json().get("error") or {}
    except ValueError:
        return None
    if not isinstance(err, dict) or err.get("code") != "context_length_exceeded":
        return None
    return str(err.get("message") or "the prompt is longer than the model's context").rstrip(".")


class RemoteBackend:
    """Streams from ``base_url`` (e.g. ``http://gpu-box:8080``); ``model`` is sent as the request's model name."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 32,
        timeout: float | None = 120.0,
    ):
        self.name = f"remote:{base_url}"
        self.base_url = base_url
        self.model = model
        self.max_concurrency = max_concurrency
        self._inflight = 0
        # One client for the backend's lifetime: its HTTP session must outlive every stream read through it.
        self._client = AsyncInferenceClient(base_url=base_url, api_key=api_key, timeout=timeout)

    def load(self) -> float:
        return min(1.0, self._inflight / self.max_concurrency)

    async def stream(
        self,
        messages: list[dict[str, str]],
        sampling: Sampling,
        cache_scope: str | None = None,
        party: str | None = None,  # the app's gate orders by it and charges the usage (app/admission.py)
    ) -> AsyncIterator[Chunk]:
        if self._inflight >= self.max_concurrency:
            raise Busy(f"{self._inflight} streams open to {self.base_url} (bound {self.max_concurrency})")
        self._inflight += 1
        client = self._client  # held by this frame while the stream is read
        events = None
        try:
            try:
                events = await client.chat_completion(
                    [{"role": m["role"], "content": m["content"]} for m in messages],
                    model=self.model,
                    stream=True,
                    max_tokens=sampling.max_new_tokens,
                    temperature=sampling.temperature,  # 0 is greedy for TGI, vLLM and OpenAI alike
                    top_p=sampling.top_p if sampling.temperature > 0 else None,
                    seed=sampling.seed,
                    stream_options={"include_usage": True},
                    extra_body={"user": party} if party else None,  # a model server schedules fairly by it
                )
            except HfHubHTTPError as e:
                if e.response is not None and e.response.status_code in (429, 503):
                    raise Busy(f"{self.base_url} answered {e.response.status_code}") from e
                if (refused := _context_refusal(e)) is not None:  # the caller's input, as the embedded engine says
                    raise ValueError(refused) from e
                raise
            except (TransportError, InferenceTimeoutError) as e:  # gone or restarting: retryable, never a hang
                raise Busy(f"{self.base_url} did not answer ({type(e).__name__})") from e
            finish: str | None = None
            prompt_tokens = completion_tokens = None
            try:
                async for event in events:
                    if event.usage is not None:
                        prompt_tokens = event.usage.prompt_tokens
                        completion_tokens = event.usage.completion_tokens
                    for choice in event.choices or []:
                        if choice.delta is not None and choice.delta.content:
                            yield Chunk(choice.delta.content)
                        if choice.finish_reason:
                            finish = choice.finish_reason
            except Exception:  # noqa: BLE001 - output has begun: end the stream, never half-raise into it
                log.exception("remote stream from %s broke", self.base_url)
                yield Chunk("", finish_reason="error")
                return
            yield Chunk(
                "",
                finish_reason=_FINISH.get(finish or "", "stop"),
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
            )
        finally:
            self._inflight -= 1
            if events is not None and hasattr(events, "aclose"):
                await events.aclose()  # closes the HTTP response now, so the server stops generating

    async def aclose(self) -> None:
        await self._client.close()
