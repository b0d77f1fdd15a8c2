"""Prometheus metrics of the product, labelled by model version so a canary's numbers stand apart.

Each app instance gets its own registry (tests build several apps in one process). Scraped at ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "flywheel_requests",
            "Chat requests by surface (ui/api), model version and outcome.",
            ["surface", "model_version", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "flywheel_tokens",
            "Tokens processed, by model version and kind (prompt, completion, prompt_cached: of the prompt tokens,"
            " those served from a cached prefix).",
            ["model_version", "kind"],
            registry=r,
        )
        self.latency = Histogram(
            "flywheel_request_latency_seconds",
            "Request to last token.",
            ["surface", "model_version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "flywheel_time_to_first_token_seconds",
            "Request to first token.",
            ["surface", "model_version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ratings = Counter(
            "flywheel_ratings",
            "Ratings by the model version rated, kind (thumbs/pairwise) and value.",
            ["model_version", "kind", "value"],
            registry=r,
        )
        self.in_flight = Gauge("flywheel_requests_in_flight", "Answers being generated.", ["model_version"], registry=r)
        self.backend_load = Gauge(
            "flywheel_backend_load", "Fraction of a backend's concurrency bound in use.", ["model_version"], registry=r
        )
        self._load_sources: dict[str, Callable[[], float]] = {}

    def watch_backend(self, model_version: str, load: Callable[[], float]) -> None:
        self._load_sources[model_version] = load

    def unwatch_backend(self, model_version: str) -> None:
        """Forget an unloaded version: its gauge goes, and so does the reference that kept its backend alive."""
        self._load_sources = {v: f for v, f in self._load_sources.items() if v != model_version}  # copy: no torn reads
        try:
            self.backend_load.remove(model_version)
        except KeyError:  # never scraped
            pass

    def render(self) -> tuple[bytes, str]:
        for version, load in self._load_sources.items():
            try:
                self.backend_load.labels(version).set(load())
            except Exception:  # noqa: BLE001 - a failing backend must not break the scrape
                pass
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
