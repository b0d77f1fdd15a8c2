"""Where MLflow is for this home: the server ``flywheel up`` started, a URI the operator gave, or the SQLite file.

Its own idea because every MLflow user in ``training/`` (the registry, the recipe runner's MLflow run, evaluation
logging) needs the same answer to "which store?", and none of them needs the registry's rules to get it.

Order: ``settings.mlflow_tracking_uri`` if set; else the server ``flywheel up`` starts (``infra/mlflow_server.py``,
127.0.0.1:5000) when it answers and its marker says it serves this home; else the same SQLite file the server
uses, opened directly. Artifacts are plain files under ``$FLYWHEEL_HOME/mlflow/artifacts`` in both cases.
"""

from __future__ import annotations

import json
import socket
from functools import lru_cache
from pathlib import Path

from feedback.settings import Settings


def mlflow_dir(settings: Settings) -> Path:
    return settings.home.resolve() / "mlflow"


def store_uri(settings: Settings) -> str:
    """The backend store the server uses and the fallback opens directly: the SQLite file, or the database
    ``flywheel_mlflow`` on the shared PostgreSQL when ``FLYWHEEL_APP_DATABASE_URL`` is set."""
    return settings.service_database_url("mlflow", "psycopg") or f"sqlite:///{mlflow_dir(settings) / 'mlflow.db'}"


def artifact_root(settings: Settings) -> str:
    return (mlflow_dir(settings) / "artifacts").as_uri()


def server_url(settings: Settings) -> str:
    return f"http://{settings.mlflow_host}:{settings.mlflow_port}"


def server_answers(settings: Settings, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((settings.mlflow_host, settings.mlflow_port), timeout=timeout):
            pass
    except OSError:
        return False
    import httpx

    try:
        return httpx.get(f"{server_url(settings)}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def tracking_uri(settings: Settings) -> str:
    if settings.mlflow_tracking_uri:
        return settings.mlflow_tracking_uri
    if _server_is_ours(settings):
        return server_url(settings)
    mlflow_dir(settings).mkdir(parents=True, exist_ok=True)
    return store_uri(settings)


def _server_is_ours(settings: Settings) -> bool:
    """The server on the port serves this home's store (``infra/mlflow_server.py`` writes the marker)."""
    marker = mlflow_dir(settings) / "server.json"
    if not marker.exists():
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    return info.get("port") == settings.mlflow_port and server_answers(settings)


def client(settings: Settings):
    """An ``MlflowClient`` for this home, and the process's fluent API pointed at the same place."""
    import mlflow

    uri = tracking_uri(settings)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return _client(uri)


@lru_cache(maxsize=8)
def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(settings: Settings, name: str = "flywheel-training") -> str:
    c = client(settings)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    (mlflow_dir(settings) / "artifacts").mkdir(parents=True, exist_ok=True)
    return c.create_experiment(name, artifact_location=f"{artifact_root(settings)}/{name}")
