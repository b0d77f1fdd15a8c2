"""Every `flywheel` command has a `--help` that works, and the read-only ones print one JSON object with
`--json` on a fresh home (no broker, no MLflow server): an operator's first commands must never crash.

The command list is walked from the real Typer app, so a new command is covered the day it is added.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from cli.main import _mount_parts, app
from tests.conftest import REPO, free_port, need_model

_mount_parts()
ROOT = typer.main.get_command(app)


def _commands(cmd, path=()):
    subs = getattr(cmd, "commands", None)
    if subs:
        for name, sub in subs.items():
            yield from _commands(sub, (*path, name))
    else:
        yield path, cmd


COMMANDS = dict(_commands(ROOT))

# Read-only commands and the exit code each gives on a fresh home: 1 where something is down or pending.
READ_ONLY = {
    ("status",): 1,  # the broker is down: says so in the JSON
    ("kafka", "status"): 1,
    ("datasets", "list"): 0,
    ("deletions", "list"): 0,
    ("keys", "list"): 0,
    ("models", "list"): 0,
    ("releases", "list"): 0,
    ("down",): 0,
}


def test_the_walk_finds_every_command_group():
    groups = {p[0] for p in COMMANDS if len(p) > 1}
    assert {"kafka", "datasets", "deletions", "app", "keys", "models", "releases"} <= groups
    assert set(READ_ONLY) <= set(COMMANDS)


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=lambda p: " ".join(p))
def test_every_command_has_help(path):
    r = CliRunner().invoke(app, [*path, "--help"], prog_name="flywheel")
    assert r.exit_code == 0, r.output
    assert "Usage: flywheel " + " ".join(path) in r.output
    assert (COMMANDS[path].help or "").strip(), f"`flywheel {' '.join(path)}` has no help text"


def _env(tmp_path) -> dict[str, str]:
    return {
        **os.environ,
        "FLYWHEEL_HOME": str(tmp_path / "home"),
        "FLYWHEEL_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",  # nothing listens there
        "FLYWHEEL_MLFLOW_PORT": "1",  # no server: the registry uses its SQLite store under the home
        "FLYWHEEL_BASE_MODEL": str(need_model(REPO / ".flywheel" / "models" / "base")),  # `make setup` made it
        "PYTHONPATH": str(REPO),
    }


@pytest.mark.integration  # reads the base model `make setup` prepared
@pytest.mark.parametrize("path", sorted(READ_ONLY), ids=lambda p: " ".join(p))
def test_read_only_commands_print_one_json_object_on_a_fresh_home(tmp_path, path):
    assert any("--json" in getattr(p, "opts", []) for p in COMMANDS[path].params)
    r = subprocess.run(
        [sys.executable, "-m", "cli.main", *path, "--json"],
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == READ_ONLY[path], r.stderr[-2000:]
    assert isinstance(json.loads(r.stdout), dict | list), r.stdout[:500]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.integration
@pytest.mark.parametrize(
    "args, says",
    [
        (["models", "show", "dpo-9999"], "flywheel models list"),
        (["datasets", "show", "feedbeef"], "flywheel datasets list"),
        (["releases", "show", "nope"], "flywheel releases list"),
    ],
    ids=["unknown-version", "unknown-snapshot", "unknown-release"],
)
def test_unknown_names_get_one_sentence_and_what_to_run(tmp_path, args, says):
    r = subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = " ".join((r.stdout + r.stderr).split())  # rich wraps long lines at the terminal width
    assert r.returncode != 0 and "Traceback" not in out, out[-2000:]
    assert says in out, out[-2000:]


@pytest.mark.integration
def test_a_missing_base_model_is_one_sentence_not_a_traceback(tmp_path):
    env = {**_env(tmp_path), "FLYWHEEL_BASE_MODEL": str(tmp_path / "nowhere")}
    r = subprocess.run(
        [sys.executable, "-m", "cli.main", "models", "show", "base", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "make setup" in json.loads(r.stdout)["error"]
