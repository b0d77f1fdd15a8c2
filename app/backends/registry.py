"""Which backend serves which model version.

``$FLYWHEEL_HOME/backends.yaml`` maps a model version (release name) to a backend; without the file the base
release is served by the embedded model at the settings' base model path. An embedded entry runs on the engine
``settings.serve_engine`` (llama.cpp on its GGUF export at ``settings.serve_precision``, or transformers) unless
the entry names its own ``engine`` / ``precision``. Example::

    base: {kind: embedded, path: .flywheel/models/base, max_concurrency: 8}
    sft-0003: {kind: embedded, path: .flywheel/models/sft-0003, engine: transformers}
    dpo-0004: {kind: embedded, path: .flywheel/models/dpo-0004, engine: llama.cpp, precision: f32}
    big: {kind: remote, url: http://gpu-box:8080, model: meta-llama/Llama-3.1-8B-Instruct, api_key_env: TGI_KEY}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from app.backends.base import Backend
from feedback.settings import Settings, get_settings

_EMBEDDED_KEYS = {"max_concurrency", "max_queue", "max_context_tokens", "num_threads"}
_TRANSFORMERS_KEYS = _EMBEDDED_KEYS | {"device"}
_LLAMA_CPP_KEYS = _EMBEDDED_KEYS | {"precision", "prefill_chunk", "prefill_max", "step_target_s"}
_REMOTE_KEYS = {"model", "max_concurrency", "timeout"}


def backend_config(settings: Settings | None = None) -> dict[str, dict[str, Any]]:
    """The version -> backend mapping: ``backends.yaml`` under the home, else the base model embedded."""
    settings = settings or get_settings()
    path = settings.home / "backends.yaml"
    if path.exists():
        config = yaml.safe_load(path.read_text()) or {}
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a mapping of model version -> backend")
        return config
    if settings.serving == "servers":  # model servers apart (app/model_servers.py publishes who serves what)
        from app.model_servers import published_servers

        return {v: {"kind": "pool", "urls": urls, "model": v} for v, urls in published_servers(settings).items()}
    if settings.backend == "remote":
        raise ValueError(f"FLYWHEEL_BACKEND=remote needs {path} naming the endpoint's url")
    return {settings.model_version: {"kind": "embedded", "path": str(settings.base_model_path)}}


def build_backend(spec: Mapping[str, Any], base_dir: Path | None = None, settings: Settings | None = None) -> Backend:
    """One backend from one mapping entry; unknown keys are errors, so a typo never passes silently."""
    spec = dict(spec)
    kind = spec.pop("kind", "embedded")
    if kind == "embedded":
        settings = settings or get_settings()
        path = Path(spec.pop("path"))
        if not path.is_absolute() and base_dir is not None and not path.exists():
            path = base_dir / path
        engine = spec.pop("engine", settings.serve_engine)
        if engine == "llama.cpp":
            from app.backends.llamacpp import LlamaCppBackend  # llama.cpp + model weights: only when asked for

            spec.setdefault("precision", settings.serve_precision)
            _check(spec, _LLAMA_CPP_KEYS, f"{kind} ({engine})")
            return LlamaCppBackend(path, **spec)
        if engine == "transformers":
            from app.backends.embedded import EmbeddedBackend  # torch + model weights: only when asked for

            _check(spec, _TRANSFORMERS_KEYS, f"{kind} ({engine})")
            return EmbeddedBackend(path, **spec)
        raise ValueError(f"unknown engine {engine!r} for an embedded backend (llama.cpp or transformers)")
    if kind == "remote":
        from app.backends.remote import RemoteBackend

        url = spec.pop("url")
        key_env = spec.pop("api_key_env", None)
        _check(spec, _REMOTE_KEYS, kind)
        return RemoteBackend(url, api_key=os.environ.get(key_env) if key_env else None, **spec)
    if kind == "pool":  # the model servers of one version (FLYWHEEL_SERVING=servers, app/model_servers.py)
        from app.backends.pool import ServerPool

        urls = spec.pop("urls")
        _check(spec, _REMOTE_KEYS, kind)
        return ServerPool(list(urls), **spec)
    raise ValueError(f"unknown backend kind {kind!r} (embedded, remote or pool)")


def _wait_for_default_server(settings: Settings, timeout_s: float = 300.0) -> dict[str, dict[str, Any]]:
    """An app replica starting beside the model servers waits for the default version's server (its model loads
    in seconds; 300 s covers a first start that exports the GGUF)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        config = backend_config(settings)
        if settings.model_version in config:
            return config
        time.sleep(0.5)
    raise ValueError(
        f"no model server answered for {settings.model_version!r} in {timeout_s:.0f} s: is `python -m "
        "app.model_servers` running (flywheel up starts it with FLYWHEEL_SERVING=servers)?"
    )


def _check(spec: Mapping[str, Any], allowed: set[str], kind: str) -> None:
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"{kind} backend: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")


def load_backends(
    settings: Settings | None = None, config: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, Backend]:
    """Build every configured backend. ``config`` overrides the file (tests, one-off servers)."""
    settings = settings or get_settings()
    if config is None:
        config = backend_config(settings)
        if settings.serving == "servers" and settings.model_version not in config:
            config = _wait_for_default_server(settings)
    if not config:
        raise ValueError("no backends configured")
    backends: dict[str, Backend] = {}
    for version, spec in config.items():
        backends[str(version)] = build_backend(spec, base_dir=settings.home, settings=settings)
    return backends
