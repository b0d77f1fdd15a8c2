"""The hostile-input campaign in its reduced form: ``benchmarks.hostile`` with a small corpus against a live
``python -m app.server`` (real model, keys required) and real Chromium. The figures that are targets must hold;
the TTFT ratio is a benchmark figure (``python -m benchmarks.hostile --json``), not asserted here."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import hostile
from tests.app.conftest import need_model
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.browser]


def test_reduced_hostile_campaign_holds():
    need_model(REPO / ".flywheel" / "models" / "base")
    if not Path(hostile.CHROMIUM).exists():
        pytest.fail(f"{hostile.CHROMIUM} is missing: apt-get update && apt-get install -y chromium")
    r = hostile.run(quick=True, browser=True, victim_n=3, flood=5, workers=4)
    assert r["requests"] >= 150, r["requests"]
    assert r["crashes_5xx"] == 0, r["crash_examples"]
    assert r["leaked_slots"] == 0
    assert r["impersonations"] == 0, r["impersonation_examples"]
    assert r["server_alive"]
    assert r["script_executions"] == 0, r["browser"]
    assert r["external_requests"] == 0, r["browser"]["external_urls"]
    assert r["browser"]["payloads_shown_as_text"] >= 3  # the payloads were on screen, as text
    assert r["by_category"]["access"].get("401", 0) >= 3 and r["by_category"]["sizes"].get("413", 0) >= 3
