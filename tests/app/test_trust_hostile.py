"""The hostile-input campaign's suite slice: ``benchmarks.hostile`` with one round of ``suite_slice`` (every case
that guards a fixed bug, a third of the rest, every category) against a live ``python -m app.server`` (real model,
keys required) and real Chromium. The figures that are targets must hold; the whole corpus and the TTFT ratio are
the benchmark's (``python -m benchmarks.hostile --json``), not asserted here."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import hostile
from tests.app.conftest import need_model
from tests.conftest import REPO

CATEGORIES = {"sampling", "unicode", "nesting", "sizes", "markup", "access", "flood", "abandon"}


def test_the_suite_slice_keeps_every_guard_and_every_category():
    """A guard that matches no case (a renamed probe) would drop a fixed bug's case from the suite unseen."""
    full = hostile.corpus(flood=5, abandon=3)
    cut = hostile.suite_slice(full)
    for category, part, why in hostile.GUARDS:
        cases = [p for p in full if p.category == category and part in p.name]
        assert cases, f"guard {category}/{part!r} matches no case ({why})"
        assert all(p in cut for p in cases), (category, part)
    assert {p.category for p in cut} == {p.category for p in full} == CATEGORIES
    assert len(cut) < len(full)


@pytest.mark.integration
@pytest.mark.browser
def test_hostile_campaign_suite_slice_holds():
    need_model(REPO / ".flywheel" / "models" / "base")
    if not Path(hostile.CHROMIUM).exists():
        pytest.fail(f"{hostile.CHROMIUM} is missing: apt-get update && apt-get install -y chromium")
    r = hostile.run(quick=True, suite=True, browser=True, victim_n=3, flood=5, workers=4)
    print("hostile suite slice phases (s):", r["phase_s"], "requests:", r["requests"])
    assert r["suite_slice"] and r["requests"] == r["planned_requests"] >= 100, r["requests"]  # every case was sent
    assert set(r["by_category"]) == CATEGORIES | {"impersonation"}, r["by_category"]
    assert r["crashes_5xx"] == 0, r["crash_examples"]
    assert r["leaked_slots"] == 0
    assert r["impersonations"] == 0, r["impersonation_examples"]
    assert r["server_alive"]
    assert r["script_executions"] == 0, r["browser"]
    assert r["external_requests"] == 0, r["browser"]["external_urls"]
    assert r["browser"]["payloads_shown_as_text"] >= 3  # the payloads were on screen, as text
    assert r["by_category"]["access"].get("401", 0) >= 3 and r["by_category"]["sizes"].get("413", 0) >= 3
