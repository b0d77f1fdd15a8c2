"""``flywheel up`` with ``FLYWHEEL_APP_REPLICAS``: one app process by default; above 1, that many replicas on the
ports after the app's and the balancer on the app's port, its nginx configuration accepted by nginx itself."""

from __future__ import annotations

import subprocess

import pytest

from cli.stack import app_children
from feedback.settings import Settings
from infra import balancer


def test_one_app_by_default_and_replicas_behind_the_balancer_when_asked(tmp_path):
    one = app_children(Settings(home=tmp_path), {})
    assert [c.name for c in one] == ["app"] and one[0].argv[-2:] == ["-m", "app.server"]
    three = app_children(Settings(home=tmp_path, app_port=7000, app_replicas=3), {"X": "1"})
    assert [c.name for c in three] == ["app-0", "app-1", "app-2", "balancer"]
    assert [c.env["FLYWHEEL_APP_PORT"] for c in three[:3]] == ["7001", "7002", "7003"]
    argv = three[-1].argv
    assert argv[argv.index("--listen") + 1] == "127.0.0.1:7000"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--upstream"] == [
        f"127.0.0.1:{p}" for p in (7001, 7002, 7003)
    ]
    with pytest.raises(ValueError):
        Settings(home=tmp_path, app_replicas=0)
    apart = app_children(Settings(home=tmp_path, app_replicas=2, serving="servers"), {})
    assert [c.name for c in apart] == ["model-servers", "app-0", "app-1", "balancer"]
    assert apart[0].argv[-2:] == ["-m", "app.model_servers"]


def test_the_balancer_configuration_is_one_nginx_accepts(tmp_path):
    cmd = balancer.prepare(tmp_path / "bal", "127.0.0.1:7000", ["127.0.0.1:7001", "127.0.0.1:7002"])
    checked = subprocess.run([*cmd, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    with pytest.raises(ValueError, match="at least one upstream"):
        balancer.config("127.0.0.1:7000", [], tmp_path)
