"""The GPU path: a model version served by vLLM's OpenAI-compatible server, reached through the remote backend.

On a GPU, vLLM (paged attention, continuous batching in CUDA) is the production answer; the app talks to it like
to any OpenAI-compatible endpoint (``remote.py``), so nothing in the app changes. This module only knows how to
start one next to the stack (``flywheel up --vllm``) and which ``backends.yaml`` entry points a version at it.
vLLM is not a dependency of the project (it needs CUDA): install it on the GPU machine (``pip install vllm``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

DEFAULT_PORT = 8000


def gpu_present() -> bool:
    """An NVIDIA GPU answers ``nvidia-smi`` (checked without importing torch or CUDA)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def vllm_installed(python: str = sys.executable) -> bool:
    return subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0


def server_argv(model_dir: Path, served_name: str, port: int = DEFAULT_PORT, python: str = sys.executable) -> list[str]:
    """vLLM's OpenAI-compatible server for one model directory, answering as ``served_name``."""
    return [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", served_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--generation-config", "auto",
    ]  # fmt: skip


def remote_entry(served_name: str, port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> dict:
    """The ``backends.yaml`` entry that serves a version from that server."""
    return {"kind": "remote", "url": f"http://{host}:{port}", "model": served_name, "max_concurrency": 64}


def point_version(backends_yaml: Path, version: str, entry: dict) -> bool:
    """Add ``version: entry`` to ``backends.yaml`` unless the file already names that version (never overwrites
    an operator's choice). True when the file was changed."""
    config = yaml.safe_load(backends_yaml.read_text()) if backends_yaml.exists() else {}
    config = config or {}
    if version in config:
        return False
    config[version] = entry
    backends_yaml.parent.mkdir(parents=True, exist_ok=True)
    backends_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
    return True


def stack_child_argv(settings) -> list[str]:
    """For ``flywheel up --vllm``: check for a GPU and vLLM, point the base version at the server (unless
    ``backends.yaml`` already names it), and return the server's command line."""
    if not gpu_present():
        raise RuntimeError("--vllm needs an NVIDIA GPU (nvidia-smi found none); without one the embedded engine serves")
    if not vllm_installed():
        raise RuntimeError("--vllm needs vLLM in this environment: pip install vllm (on the GPU machine)")
    name = settings.model_version
    if point_version(settings.home / "backends.yaml", name, remote_entry(name)):
        print(f"backends.yaml: {name} -> vLLM at http://127.0.0.1:{DEFAULT_PORT}")
    return server_argv(settings.base_model_path, name)
