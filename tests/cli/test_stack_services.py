"""The services ``flywheel up`` adds for training: the real MLflow server (the registry resolves to it while it
answers, and falls back to the same SQLite store when it is gone) and its refusal of a port someone else holds."""

from __future__ import annotations

import json
import os
import socket

import httpx
import pytest

from feedback.settings import Settings
from infra import mlflow_server
from tests.conftest import REPO, free_port, need_model

BASE = REPO / ".flywheel" / "models" / "base"


@pytest.mark.integration
def test_mlflow_server_serves_the_registry_and_stops_cleanly(tmp_path):
    from training import registry

    s = Settings(home=tmp_path / "home", mlflow_port=free_port(), base_model=str(need_model(BASE)))
    url = f"http://127.0.0.1:{s.mlflow_port}"
    try:
        st = mlflow_server.start(s)
        assert st["healthy"] and st["ours"]
        marker = json.loads((tmp_path / "home" / "mlflow" / "server.json").read_text())
        assert marker["port"] == s.mlflow_port and marker["pid"] == st["pid"]
        assert registry.tracking_uri(s) == url
        base = registry.ensure_base(s)
        # Registered through the server: its REST API answers with the version and its lineage tags.
        got = httpx.get(f"{url}/api/2.0/mlflow/registered-models/get", params={"name": s.registered_model}, timeout=30)
        assert got.status_code == 200, got.text
        versions = got.json()["registered_model"]["latest_versions"]
        assert [v["version"] for v in versions] == [str(base.number)]
        assert {t["key"]: t["value"] for t in versions[0]["tags"]}["flywheel.name"] == "base"
        assert mlflow_server.start(s)["pid"] == st["pid"]  # a second start is harmless
    finally:
        stopped = mlflow_server.stop(s)
    assert stopped and not (tmp_path / "home" / "mlflow" / "server.json").exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(st["pid"], 0)  # the whole process group is gone (uvicorn included)
    assert not mlflow_server.healthy(s)
    # Without the server the registry opens the same store directly and finds what was registered through it.
    assert registry.tracking_uri(s) == mlflow_server.store_uri(s)
    assert [v.name for v in registry.list_versions(s, include_base=True)] == ["base"]


def test_mlflow_server_refuses_a_port_held_by_another_process(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        s = Settings(home=tmp_path / "home", mlflow_port=sock.getsockname()[1])
        with pytest.raises(mlflow_server.MlflowServerError, match="taken by another process.*FLYWHEEL_MLFLOW_PORT"):
            mlflow_server.start(s)
    assert not (tmp_path / "home" / "mlflow" / "server.json").exists()
