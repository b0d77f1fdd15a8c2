"""One frozen settings object for every Flywheel service, overridable by ``FLYWHEEL_*`` variables.

Lives in the data plane (``feedback/``) because every other part imports it and ``feedback/`` imports
nothing of the project. Example: ``FLYWHEEL_KAFKA_BOOTSTRAP=broker1:9092,broker2:9092 flywheel status``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", frozen=True, extra="ignore")

    home: Path = Field(Path(".flywheel"), description="All state: Kafka log, warehouse, models, snapshots.")

    # Kafka: the same code runs against a production cluster by changing these three.
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Comma-separated bootstrap servers.")
    kafka_partitions: int = Field(3, ge=1, description="Partitions for new topics.")
    kafka_replication: int = Field(1, ge=1, description="Replication factor for new topics (3 in production).")
    kafka_min_insync: int = Field(1, ge=1, description="min.insync.replicas for new topics (2 in production).")
    kafka_controller_port: int = Field(9093, description="Local KRaft controller port (local broker only).")
    kafka_heap: str = Field("768m", description="JVM heap of the local broker.")
    kafka_local_brokers: int = Field(
        1, ge=1, le=5, description="Local brokers `flywheel up` / `flywheel kafka start` run (3: RF 3, min ISR 2)."
    )
    topic_prefix: str = Field("flywheel", description="Topics are <prefix>.turns, .feedback, .dlq, .releases.")

    # Producer
    spool_dir: Path | None = Field(None, description="Durable outbox; default <home>/spool.")
    producer_linger_ms: int = Field(5, ge=0)
    spool_max_bytes: int = Field(
        1024**3, ge=1024 * 1024, description="Outbox bound: beyond it new events are refused (broker down too long)."
    )
    spool_fsync: Literal["always", "interval", "never"] = Field(
        "interval", description="always: fdatasync per event; interval: at most every spool_fsync_interval_ms; never."
    )
    spool_fsync_interval_ms: int = Field(200, ge=1, description="Interval policy: most time lost at power loss.")
    payload_encryption: bool = Field(
        True, description="Seal event payloads with per-user keys at the Kafka edge (deleting a user shreds the key)."
    )

    # Ingest
    ingest_group: str = Field("flywheel-ingest", description="Consumer group of the DuckDB sink.")
    ingest_batch_max: int = Field(5000, ge=1, description="Flush after this many messages ...")
    ingest_batch_ms: int = Field(200, ge=1, description="... or after this many milliseconds.")
    ingest_session_timeout_ms: int = Field(
        10_000, ge=6_000, description="A dead consumer's partitions move to another after this."
    )
    max_event_bytes: int = Field(256 * 1024, ge=1024, description="Bigger messages go to the DLQ.")
    warehouse_lock_timeout_s: float = Field(30.0, description="How long to wait for the DuckDB file lock.")

    # Services
    app_host: str = "127.0.0.1"
    app_port: int = 7860
    app_replicas: int = Field(
        1,
        ge=1,
        le=16,
        description="App processes `flywheel up` runs; above 1, Debian's nginx answers on app_port and spreads "
        "requests over replicas on the ports after it (infra/balancer.py); they share <home> or the database.",
    )
    app_database_url: SecretStr | None = Field(
        None,
        description="PostgreSQL URL of the app's shared state (sessions, keys, roles, rate limits) across machines; "
        "unset: SQLite files under <home>/app/. `flywheel db start` runs a local one and prints its URL.",
    )
    db_port: int = Field(5433, description="Port of the local PostgreSQL `flywheel db start` runs (5432 is Debian's).")
    prefect_host: str = "127.0.0.1"
    prefect_port: int = 4200
    prefect_work_pool: str = Field(
        "flywheel-cpu", description="Process work pool of the `train` deployment; `flywheel up` starts its worker."
    )
    prefect_gpu_work_pool: str = Field(
        "flywheel-gpu", description="Pool of the `train-gpu` deployment (gpu configs); a GPU machine joins it."
    )
    base_model: str = Field("", description="Path of the base model; default <home>/models/base.")
    model_version: str = Field("base", description="Release name of the base model.")
    backend: Literal["embedded", "remote"] = "embedded"
    serving: Literal["embedded", "servers"] = Field(
        "embedded",
        description="Where models run: in each app process (embedded, the default for one machine), or in model "
        "server processes apart from the app (servers: `flywheel up` starts app/model_servers.py, which runs one "
        "server per version the release plan names; the app streams from them through the remote backend).",
    )
    model_servers_per_version: int = Field(
        1,
        ge=1,
        le=8,
        description="With serving=servers: model servers per version (an answer goes to the least "
        "loaded; losing one costs only the answers it was streaming).",
    )
    model_server_places: str = Field(
        "",
        description="With serving=servers: where model servers run, comma-separated `[netns/]host` (server i of a "
        "version goes to place i mod their count; a netns is a network namespace, `benchmarks.fleet --netns` makes "
        "them). Empty: every server on 127.0.0.1. Off loopback, servers and app need FLYWHEEL_MODEL_SERVER_TOKEN.",
    )
    serve_engine: Literal["llama.cpp", "transformers"] = Field(
        "llama.cpp",
        description="Engine of in-process (embedded) backends: llama.cpp (GGUF export made on first load, fast on "
        "CPU) or transformers (the fp32 reference; CUDA). A backends.yaml entry's `engine` key wins.",
    )
    serve_precision: Literal["f32", "f16", "bf16", "q8_0"] = Field(
        "f16",
        description="Weight precision llama.cpp serves (quality vs fp32 measured in benchmarks/results/serve.json). "
        "A backends.yaml entry's `precision` key wins.",
    )

    # Operators and the model registry
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for operator actions (releases, dashboard, detail pages); no default."
    )
    # The app's trust boundary (app/server.py, app/api.py, app/keys.py, app/validation.py)
    api_auth: Literal["auto", "keys", "local"] = Field(
        "auto",
        description="/v1 access: 'keys' needs an API key (`flywheel keys create`); 'local' is keyless and "
        "refuses any non-loopback address; 'auto' is 'keys' once a key was ever created, else 'local'.",
    )
    app_allowed_hosts: str = Field(
        "",
        description="Comma-separated Host header names the app answers (DNS-rebinding guard); '*' allows any. "
        "Default: localhost, 127.0.0.1, ::1 and app_host.",
    )
    app_auth: SecretStr | None = Field(
        None, description="Optional browser login, 'alice:secret,bob:hunter2'; none = signed-cookie users."
    )
    app_max_new_tokens: int = Field(256, ge=1, le=32_768, description="Answer length in the browser UI (tokens).")
    api_max_new_tokens: int = Field(2048, ge=1, le=32_768, description="Largest max_tokens an API client may ask.")
    app_max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest HTTP request body, counted as it streams.")
    app_context_tokens: int = Field(2048, ge=256, description="Context window of a backend that reports none.")
    app_chars_per_token: float = Field(
        4.0, gt=0, description="Characters per token used to turn a context window into character limits."
    )
    app_message_share: float = Field(
        0.5, gt=0, le=1, description="Share of the context window one message may fill (the rest: history, answer)."
    )
    app_max_messages: int = Field(40, ge=1, description="Messages in one conversation sent to the model.")
    api_rate_per_key: float = Field(5.0, gt=0, description="Sustained /v1 requests per second per key (or client).")
    api_burst_per_key: int = Field(20, ge=1, description="Requests a key (or client) may send at once before the rate.")
    api_streams_per_key: int = Field(2, ge=1, description="Answers one key (or client) may have in progress at once.")
    app_turn_claim_s: float = Field(
        30.0, gt=0, description="A started answer nobody reads within this time is cancelled and its slot freed."
    )
    app_max_loaded_versions: int = Field(
        3,
        ge=1,
        description="Model versions the app keeps loaded at once; past it the least recently used one is unloaded "
        "(never the base, one the release plan names, or one answering a request).",
    )
    mlflow_host: str = "127.0.0.1"
    mlflow_port: int = 5000
    mlflow_tracking_uri: str = Field(
        "",
        description="Tracking/registry server; default http://<mlflow_host>:<mlflow_port> when it answers, "
        "else the SQLite store under <home>/mlflow.",
    )
    registered_model: str = Field("flywheel-chat", description="The one registered model every version belongs to.")

    def service_database_url(self, service: str, driver: str) -> str | None:
        """With ``app_database_url`` set, the URL of another service's own database on that PostgreSQL server
        (``flywheel_<service>``: MLflow's, Prefect's), for SQLAlchemy's ``driver`` (psycopg, asyncpg); else None."""
        from urllib.parse import urlsplit, urlunsplit

        if self.app_database_url is None:
            return None
        parts = urlsplit(self.app_database_url.get_secret_value())
        return urlunsplit((f"postgresql+{driver}", parts.netloc, f"/flywheel_{service}", parts.query, ""))

    def child_env(self, pythonpath: Path | None = None) -> dict[str, str]:
        """The environment a child process needs to see these same settings (``FLYWHEEL_*``), on top of ours."""
        import json
        import os

        env = dict(os.environ)
        for name in type(self).model_fields:
            value = getattr(self, name)
            key = f"FLYWHEEL_{name.upper()}"
            if value is None:
                env.pop(key, None)
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[key] = json.dumps(value) if isinstance(value, list | dict | tuple | set) else str(value)
        if pythonpath is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), *filter(None, [env.get("PYTHONPATH")])])
        return env

    @property
    def topics(self) -> dict[str, str]:
        p = self.topic_prefix
        return {k: f"{p}.{k}" for k in ("turns", "feedback", "dlq", "releases")}

    @property
    def topic_turns(self) -> str:
        return f"{self.topic_prefix}.turns"

    @property
    def topic_feedback(self) -> str:
        return f"{self.topic_prefix}.feedback"

    @property
    def topic_dlq(self) -> str:
        return f"{self.topic_prefix}.dlq"

    @property
    def topic_releases(self) -> str:
        return f"{self.topic_prefix}.releases"

    @property
    def bootstrap_servers(self) -> list[str]:
        return [s.strip() for s in self.kafka_bootstrap.split(",") if s.strip()]

    @property
    def warehouse_path(self) -> Path:
        return self.home / "warehouse.duckdb"

    @property
    def spool_path(self) -> Path:
        return self.spool_dir or (self.home / "spool")

    @property
    def kafka_dir(self) -> Path:
        return self.home / "kafka"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def base_model_path(self) -> Path:
        return Path(self.base_model) if self.base_model else self.models_dir / "base"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings from the environment; pass an explicit ``Settings`` in tests instead."""
    return Settings()
