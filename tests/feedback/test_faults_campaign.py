"""The fault campaign's suite slice: the real app, ingest and broker as processes, a user chatting and rating
through the public API, while ingest is SIGKILLed, the broker goes away and the outbox disk fills up (the faults
whose runs found bugs, ``benchmarks.faults.SUITE_FAULTS``). Every acknowledged event must be in the warehouse
exactly once (every fault, and three brokers: ``python -m benchmarks.faults``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.faults import ALL_FAULTS, SUITE_FAULTS
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_reduced_fault_campaign_loses_and_duplicates_nothing():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.faults",
            "--faults",
            "suite",
            "--no-prefect",
            "--seconds",
            "3",
            "--users",
            "1",
            "--outage-s",
            "2",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(f["fault"] for f in result["faults"]) == sorted(SUITE_FAULTS) and set(SUITE_FAULTS) <= set(ALL_FAULTS)
    assert result["events_acknowledged"] > 0 and result["turns_acknowledged"] > 0
    assert result["lost"] == 0, result
    assert result["duplicated"] == 0, result
    assert all(f["recovery_s"] > 0 for f in result["faults"])
