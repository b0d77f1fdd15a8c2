"""The GPU path's wiring (no GPU here): `flywheel up --vllm` refuses clearly without one, and pointing a version
at a vLLM server adds a remote entry to backends.yaml without ever overwriting an operator's entry."""

from __future__ import annotations

import pytest

from app.backends.registry import backend_config
from app.backends.vllm import gpu_present, point_version, remote_entry, server_argv, stack_child_argv, vllm_installed
from feedback.settings import Settings


def test_pointing_a_version_at_vllm_keeps_existing_entries(tmp_path):
    path = tmp_path / "backends.yaml"
    path.write_text("base: {kind: embedded, path: models/base}\n")
    assert point_version(path, "dpo-0003", remote_entry("dpo-0003", port=8123))
    assert not point_version(path, "base", remote_entry("base"))  # the operator's choice stays
    config = backend_config(Settings(home=tmp_path))
    assert config["base"] == {"kind": "embedded", "path": "models/base"}
    assert config["dpo-0003"] == {
        "kind": "remote",
        "url": "http://127.0.0.1:8123",
        "model": "dpo-0003",
        "max_concurrency": 64,
    }
    argv = server_argv(tmp_path / "models" / "dpo-0003", "dpo-0003", port=8123)
    assert argv[argv.index("--served-model-name") + 1] == "dpo-0003" and argv[argv.index("--port") + 1] == "8123"


def test_up_with_vllm_refuses_clearly_without_a_gpu_or_vllm(tmp_path):
    settings = Settings(home=tmp_path)
    if gpu_present() and vllm_installed():  # a GPU machine with vLLM: the command line for the base version
        argv = stack_child_argv(settings)
        assert argv[argv.index("--served-model-name") + 1] == settings.model_version
        return
    with pytest.raises(RuntimeError, match="needs (an NVIDIA GPU|vLLM)"):
        stack_child_argv(settings)
    assert not (tmp_path / "backends.yaml").exists()  # nothing was pointed at a server that cannot start
