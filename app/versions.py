"""Which model versions this app has loaded: loading in the background, pinning while answering, unloading.

Its own idea because it is a small resource manager with its own lock and its own rules, apart from answering a
turn (``app/service.py``): model versions come and go without a restart. A version a release plan names is
loaded in the background (its users are served by the default version until it is ready), and so is a vetted
registered version that a request names (its lineage says it passed its gate and is not tainted). At most
``app_max_loaded_versions`` stay loaded: past the bound the least recently used one is unloaded and its backend
closed, never the default version, one the plan names, or one with answers in flight (every turn pins its
version until it completes).

``backends`` is replaced, never changed in place (copy-on-write), so a reader on another thread never sees a
half-updated mapping.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

from app.backends.base import Backend
from app.metrics import Metrics
from app.router import ReleasePlan, ReleaseRouter, servable_dir
from feedback.settings import Settings

log = logging.getLogger(__name__)

RETIRE_AFTER_S = 120.0  # a replaced pool of model servers is closed this long after (its answers end first)


def _close_backend(version: str, backend: Backend) -> None:
    """Close an unloaded backend on its own thread (a decode thread may take a moment to stop)."""
    try:
        asyncio.run(backend.aclose())
    except Exception:  # noqa: BLE001 - the version is unloaded either way; its memory goes with the last reference
        log.exception("closing the unloaded backend of %s failed", version)


class LoadedVersions:
    """The backends serving model versions in this process, and the versions being loaded or unloaded."""

    def __init__(self, settings: Settings, backends: dict[str, Backend], router: ReleaseRouter, metrics: Metrics):
        if not backends:
            raise ValueError("at least one backend is needed")
        self.settings = settings
        self.router = router
        self.metrics = metrics
        self.backends = backends
        self.loaded: dict[str, Backend] = {}  # loaded here (plan or request); closed when unloaded or at shutdown
        self.load_errors: dict[str, str] = {}
        self.unloaded: list[str] = []  # versions unloaded past app_max_loaded_versions, in order
        self.loading: set[str] = set()
        self._requested_load: str | None = None  # the one version being loaded because a request named it
        self._mu = threading.RLock()
        self._in_use: dict[str, int] = {}  # turns in flight per version (never unloaded while > 0)
        self._last_used: dict[str, float] = {}
        for version, backend in backends.items():
            metrics.watch_backend(version, backend.load)

    @property
    def default_version(self) -> str:
        base = self.settings.model_version
        return base if base in self.backends else next(iter(self.backends))

    # ---- loading for new releases and for requests -----------------------------------------------
    def _spec_for(self, version: str) -> dict | None:
        """How to serve a version: its entry in ``backends.yaml``, else a model directory of that name."""
        from app.backends.registry import backend_config

        try:
            spec = backend_config(self.settings).get(version)
        except ValueError as e:
            log.warning("cannot read the backend config: %s", e)
            spec = None
        servers = self.settings.serving == "servers"  # then only a model server serves it, never this process
        if spec is None and not servers and (path := servable_dir(self.settings, version)) is not None:
            spec = {"kind": "embedded", "path": str(path)}
        return spec

    def prepare(self, plan: ReleasePlan) -> None:
        """Start loading a backend for every version the plan names that none serves yet (in the background:
        until it is ready, its users are served by the fallback); versions the plan dropped may now be unloaded."""
        for version in plan.versions():
            with self._mu:
                if version in self.backends or version in self.loading:
                    continue
                spec = self._spec_for(version)
                if spec is None:
                    continue
                self.loading.add(version)
            self._start_load(version, spec)
        self.evict()

    def _start_load(self, version: str, spec: dict) -> None:
        threading.Thread(target=self._load, args=(version, spec), name=f"load-{version}", daemon=True).start()

    def load_on_request(self, version: str) -> None:
        """A request named a version nobody serves: load it in the background if it may be served on request
        (one such load at a time, so requests cannot make the app churn through models; none while the default
        and the plan's versions fill ``app_max_loaded_versions``, as it would be unloaded as soon as it loaded)."""
        keep = {*self.router.plan.versions(), self.default_version}
        with self._mu:
            if version in self.backends or version in self.loading or self._requested_load is not None:
                return
            if len(keep & set(self.backends)) >= self.settings.app_max_loaded_versions:
                return
            spec = self._requestable_spec(version)
            if spec is None:
                return
            self.loading.add(version)
            self._requested_load = version
        log.info("loading model version %s because a request named it", version)
        self._start_load(version, spec)

    def _requestable_spec(self, version: str) -> dict | None:
        """How to serve ``version`` on request: an operator's ``backends.yaml`` entry, or a registered chat model
        whose ``lineage.json`` says it passed its gate and is not tainted (a plan may name any servable version;
        a request may not bring an unvetted, tainted or reward model online)."""
        spec = self._spec_for(version)
        if spec is None or spec.get("kind") != "embedded" or version == self.settings.model_version:
            return spec
        path = servable_dir(self.settings, version)
        if path is None:
            return spec  # a backends.yaml entry of the operator's own
        try:
            lineage = json.loads((path / "lineage.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(lineage, dict):
            return None
        vetted = lineage.get("kind", "policy") == "policy" and lineage.get("gate") == "passed"
        return spec if vetted and lineage.get("tainted") is False else None

    def _load(self, version: str, spec: dict) -> None:
        from app.backends.registry import build_backend

        try:
            backend = build_backend(spec, base_dir=self.settings.home, settings=self.settings)
        except Exception as e:  # noqa: BLE001 - reported in /healthz; the fallback keeps serving
            log.exception("could not load a backend for %s", version)
            self.load_errors[version] = f"{type(e).__name__}: {e}"
        else:
            with self._mu:
                self.loaded[version] = backend
                self._last_used[version] = time.monotonic()
                self.metrics.watch_backend(version, backend.load)
                self.backends = {**self.backends, version: backend}  # copy-on-write: readers never see a half dict
                self.load_errors.pop(version, None)
            log.info("model version %s is now served by %s", version, backend.name)
        finally:
            with self._mu:
                self.loading.discard(version)
                if self._requested_load == version:
                    self._requested_load = None
        self.evict()

    # ---- model servers apart (FLYWHEEL_SERVING=servers) -------------------------------------------
    def watch_servers(self, stop: threading.Event, every_s: float = 1.0) -> threading.Thread:
        """Follow what ``app/model_servers.py`` publishes: a version the plan names whose server came up is loaded
        (a pool of its servers), and one whose servers changed (added, removed) is reloaded. Runs until ``stop``."""
        from app.model_servers import published_servers

        def loop() -> None:
            while not stop.wait(every_s):
                try:
                    self._follow_servers(published_servers(self.settings))
                    self.prepare(self.router.plan)
                except Exception:  # noqa: BLE001 - the next look may succeed; the served versions stay as they are
                    log.exception("could not follow the model servers")

        thread = threading.Thread(target=loop, name="watch-model-servers", daemon=True)
        thread.start()
        return thread

    def _follow_servers(self, published: dict[str, list[str]]) -> None:
        """A served version whose servers changed gets a new pool of them (cheap: no model loads here); the old
        pool is closed after its answers in flight had time to end. A version with no server published at the
        moment keeps its pool, which refuses retryably until its server is back at the same address."""
        from app.backends.pool import ServerPool

        with self._mu:
            for version, old in list(self.backends.items()):
                urls = published.get(version)
                if not urls or not hasattr(old, "urls") or old.urls == urls:
                    continue
                log.info("the model servers of %s are now %s", version, ", ".join(urls))
                new = ServerPool(urls, model=version)
                self.backends = {**self.backends, version: new}
                if version in self.loaded:
                    self.loaded[version] = new
                self.metrics.watch_backend(version, new.load)  # the gauge reads the pool in use, not the retired one
                timer = threading.Timer(RETIRE_AFTER_S, _close_backend, args=(version, old))
                timer.daemon = True
                timer.start()

    # ---- unloading past the bound ----------------------------------------------------------------
    def evict(self) -> None:
        """Past ``app_max_loaded_versions``, unload the least recently used versions this service loaded (never the
        default or one the plan names) and close their backends. "Used" is loaded or given a turn; a victim with a
        turn in flight stays until that turn completes (its completion calls this again), so a busy old version
        never makes a freshly loaded one go instead."""
        keep = {*self.router.plan.versions(), self.default_version}
        with self._mu:
            excess = len(self.backends) - self.settings.app_max_loaded_versions
            if excess <= 0:
                return
            oldest = sorted((v for v in self.loaded if v not in keep), key=lambda v: self._last_used.get(v, 0.0))
            victims = {v: self.loaded.pop(v) for v in oldest[:excess] if not self._in_use.get(v)}
            if not victims:
                return
            self.backends = {v: b for v, b in self.backends.items() if v not in victims}  # copy-on-write
            for version in victims:
                self.metrics.unwatch_backend(version)
                self._last_used.pop(version, None)
                self.unloaded.append(version)
        for version, backend in victims.items():
            log.info(
                "unloading model version %s (least recently used past %d loaded versions)",
                version,
                self.settings.app_max_loaded_versions,
            )
            threading.Thread(
                target=_close_backend, args=(version, backend), name=f"unload-{version}", daemon=True
            ).start()

    def forget_cached_prompts(self, user_id: str) -> int:
        """Every loaded version drops the prompt prefixes it cached for ``user_id``; returns the slots cleared."""
        return sum(
            forget(user_id)
            for backend in list(self.backends.values())
            if (forget := getattr(backend, "forget_scope", None)) is not None
        )

    # ---- pins: a version answering a turn is never unloaded --------------------------------------
    def pin(self, version: str) -> tuple[str, Backend]:
        """Mark one more turn in flight on ``version`` (the default if it was unloaded a moment ago)."""
        with self._mu:
            backend = self.backends.get(version)
            if backend is None:
                version = self.default_version
                backend = self.backends[version]
            self._in_use[version] = self._in_use.get(version, 0) + 1
            self._last_used[version] = time.monotonic()
            return version, backend

    def unpin(self, version: str) -> None:
        with self._mu:
            left = self._in_use.get(version, 0) - 1
            if left > 0:
                self._in_use[version] = left
            else:
                self._in_use.pop(version, None)
        if left <= 0:
            self.evict()
