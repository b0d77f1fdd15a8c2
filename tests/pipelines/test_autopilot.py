"""The release autopilot against the real Kafka broker, the real MLflow registry (SQLite under the test's home) and
a real DuckDB warehouse: candidates go one at a time in registered order (one that passes while a release runs
waits its turn), one without a gate decision (its evaluation crashed), a failed one and a tainted one are never
released, a candidate tainted mid-canary is rolled back; under ``approve`` a candidate waits for an operator, and
``flywheel releases approve`` without the token is refused; an autopilot SIGKILLed mid-canary is replaced by one
that resumes the same release from the log."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from feedback.events import ChatTurn, Feedback, Message
from feedback.settings import Settings
from pipelines.autopilot import ACTOR, Autopilot, read_status
from pipelines.config import ReleaseConfig
from pipelines.release import ReleaseLog
from tests.conftest import REPO, settings_env
from tests.pipelines.conftest import seed
from tests.pipelines.test_release import make_version

pytestmark = pytest.mark.integration

TOKEN = "autopilot-test-token"
# Few ratings decide: 10 liked answers per arm put the always-valid interval's lower end near -0.28 > -margin.
FAST = {
    "steps": (0.5, 1.0),
    "min_thumbs": 3,
    "min_step_s": 0,
    "margin": 0.5,
    "mixture_sd": 0.3,
    "poll_s": 0.3,
    "publish_timeout_s": 10,
}
N = 10


@pytest.fixture
def world(settings: Settings) -> Settings:
    """Fresh topics and home; MLflow's SQLite store under the home (no server); the base registered."""
    from training import registry

    s = settings.model_copy(update={"mlflow_port": 1})
    registry.ensure_base(s)
    return s


def rate(settings: Settings, version: str, n: int, liked: bool = True) -> None:
    """``n`` answers of ``version`` given now, each rated by its user (what the canary analysis reads)."""
    now = datetime.now(UTC)
    events: list = []
    for i in range(n):
        tid = f"{version}-{uuid.uuid4().hex[:8]}"
        user = f"user-{i}"
        common = dict(user_id=user, consent=True, conversation_id=f"c-{tid}", turn_id=tid, model_version=version)
        events.append(
            ChatTurn(
                event_id=f"t-{tid}",
                ts=now,
                messages=[Message(role="user", content=f"question {i}")],
                answer=f"answer {i}",
                latency_ms=100.0,
                ttft_ms=20.0,
                **common,
            )
        )
        events.append(Feedback(event_id=f"f-{tid}", ts=now, kind="thumbs", value="up" if liked else "down", **common))
    seed(settings.warehouse_path, events)


def _released(settings: Settings) -> list[tuple[str, str]]:
    return [(r.candidate, r.status) for r in ReleaseLog(settings).releases()]


def test_candidates_go_in_registered_order_and_unreleasable_ones_never(world):
    from training import registry

    said: list[str] = []
    ap = Autopilot(world, ReleaseConfig(policy="auto", **FAST), say=said.append)
    first = make_version(world, "first")
    crashed = make_version(world, "crashed", gate=None)  # registered, never evaluated: its evaluation crashed
    failed = make_version(world, "failed", gate=False)

    st = ap.step()
    assert (st.candidate, st.status, st.share, st.production) == (first, "canary", 0.5, "base")
    assert st.last.actor == ACTOR and "gate passed" in st.last.reason

    # Two candidates pass their gate while that release runs: both wait, in registered order.
    second = make_version(world, "second")
    third = make_version(world, "third")
    tainted = make_version(world, "tainted", snapshot_id="snap-gone")
    assert registry.taint_trained_on(world, {"snap-gone": "a contributor asked for deletion"}) == [tainted]
    st = ap.step()
    assert (st.candidate, st.status) == (first, "canary")
    status = read_status(world)
    assert [c["version"] for c in status["waiting"]] == [second, third]
    held = {h["version"]: h["why"] for h in status["held"]}
    assert held[crashed].startswith("no gate decision") and "failed on purpose" in held[failed]
    assert held[tainted].startswith("tainted")

    # Live ratings decide the first; at the same look the next candidate starts against the new production.
    rate(world, first, N)
    rate(world, "base", N)
    st = ap.step()
    assert (st.candidate, st.status, st.production) == (second, "canary", first)
    assert registry.get_alias(world, "production") == first
    rate(world, second, N)
    rate(world, first, N)
    st = ap.step()
    assert (st.candidate, st.status, st.production) == (third, "canary", second)

    # Tainted mid-canary (a deletion reached its data): rolled back at once, never promoted.
    d = Path(registry.get_version(world, third).path) / "lineage.json"
    d.write_text(json.dumps({**json.loads(d.read_text()), "tainted": True, "tainted_reason": "deleted user"}))
    rate(world, third, N)
    rate(world, second, N)
    st = ap.step()
    assert (st.candidate, st.status) == (third, "rolled_back") and "tainted" in st.last.reason
    for _ in range(2):
        ap.step()
    assert _released(world) == [(first, "full"), (second, "full"), (third, "rolled_back")]
    assert registry.get_alias(world, "production") == second
    assert read_status(world)["waiting"] == []
    assert any(line.startswith(f"held: {crashed} will not be released: no gate decision") for line in said)
    assert any(line.startswith(f"full: {first}") for line in said), said


def _cli(settings: Settings, monkeypatch, *args: str, admin: str | None = TOKEN) -> tuple[int, dict]:
    """``flywheel releases ...`` as an operator runs it (in this process: each new interpreter costs ~30 s here)."""
    from typer.testing import CliRunner

    from cli.main import _mount_parts, app
    from feedback.settings import get_settings

    if not any(g.name == "releases" for g in app.registered_groups):
        _mount_parts()
    for k, v in {**settings_env(settings), "FLYWHEEL_MLFLOW_PORT": "1"}.items():
        if k.startswith("FLYWHEEL_"):
            monkeypatch.setenv(k, v)
    monkeypatch.delenv("FLYWHEEL_OPERATOR_TOKEN", raising=False)
    monkeypatch.delenv("FLYWHEEL_RELEASE_POLICY", raising=False)  # the policy shown is the running autopilot's
    if admin:
        monkeypatch.setenv("FLYWHEEL_ADMIN_TOKEN", admin)
    else:
        monkeypatch.delenv("FLYWHEEL_ADMIN_TOKEN", raising=False)
    get_settings.cache_clear()
    try:
        r = CliRunner().invoke(app, ["releases", *args, "--json"], prog_name="flywheel")
    finally:
        get_settings.cache_clear()
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r.exit_code, json.loads(r.stdout)


def test_approve_mode_waits_for_the_operator_and_approve_needs_the_token(world, monkeypatch):
    said: list[str] = []
    ap = Autopilot(world, ReleaseConfig(policy="approve", **FAST), say=said.append)
    cand = make_version(world, "candidate")
    failed = make_version(world, "failed", gate=False)
    for _ in range(2):
        assert ap.step() is None  # waits: nothing released without an operator
    assert ReleaseLog(world).records() == []
    assert f"gate PASSED: {cand} (candidate from base on snapshot None): waiting for approval" in said

    rc, listed = _cli(world, monkeypatch, "list")
    assert rc == 0 and listed["releases"] == []
    assert listed["candidates"]["policy"] == "approve"  # the running autopilot's policy, from its status file
    assert [(c["version"], c["approval"]) for c in listed["candidates"]["waiting"]] == [(cand, None)]
    assert listed["candidates"]["next"] is None

    rc, out = _cli(world, monkeypatch, "approve", cand, admin=None)
    assert rc == 1 and out == {"ok": False, "error": out["error"]} and "no admin token is configured" in out["error"]
    rc, out = _cli(world, monkeypatch, "approve", cand, "--token", "wrong")
    assert rc == 1 and out["error"] == (
        "refused: operator actions need the admin token (--token or FLYWHEEL_OPERATOR_TOKEN)"
    )
    rc, out = _cli(world, monkeypatch, "approve", failed, "--token", TOKEN)
    assert rc == 1 and out["error"].startswith(f"refused: {failed} is not releasable: gate failed")
    rc, out = _cli(world, monkeypatch, "approve", "nope-0099", "--token", TOKEN)
    assert rc == 1 and "is not a candidate waiting for release" in out["error"]
    assert ap.step() is None and ReleaseLog(world).records() == []  # refusals approved nothing

    rc, out = _cli(world, monkeypatch, "approve", cand, "--token", TOKEN, "--reason", "read the eval")
    assert rc == 0 and out["candidate"]["approval"]["actor"].startswith("operator:")
    st = ap.step()
    assert (st.candidate, st.status, st.last.actor) == (cand, "canary", ACTOR)
    assert "approved by operator:" in st.last.reason and "read the eval" in st.last.reason
    rc, out = _cli(world, monkeypatch, "approve", cand, "--token", TOKEN)
    assert rc == 1 and "has been released already" in out["error"]


def _autopilot(settings: Settings, log: Path) -> subprocess.Popen:
    env = {
        **settings_env(settings),
        "FLYWHEEL_MLFLOW_PORT": "1",
        "FLYWHEEL_RELEASE_POLICY": "auto",
        "FLYWHEEL_RELEASE_STEPS": json.dumps(FAST["steps"]),
        "FLYWHEEL_RELEASE_MIN_THUMBS": str(FAST["min_thumbs"]),
        "FLYWHEEL_RELEASE_MIN_STEP_S": "0",
        "FLYWHEEL_RELEASE_MARGIN": str(FAST["margin"]),
        "FLYWHEEL_RELEASE_MIXTURE_SD": str(FAST["mixture_sd"]),
        "FLYWHEEL_RELEASE_POLL_S": "0.5",
    }
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "pipelines.autopilot"], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT
        )


def _wait(cond, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"{what} within {timeout:.0f}s\n{tails}")


def test_autopilot_killed_mid_canary_is_resumed_by_the_next_one(world, tmp_path):
    cand = make_version(world, "candidate")
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    first = _autopilot(world, logs[0])
    second = None
    try:

        def canary() -> bool:
            st = ReleaseLog(world).current()
            return st is not None and st.status == "canary" and st.pending is None

        _wait(canary, 180, "the first autopilot did not start the canary", logs)
        started = ReleaseLog(world).current()
        second = _autopilot(world, logs[1])  # what `flywheel up` does after a crash; here it starts early
        _wait(lambda: "another autopilot runs" in logs[1].read_text(), 120, "the second did not wait", logs)
        first.send_signal(signal.SIGKILL)  # mid-canary, no clean-up of its own
        assert first.wait(10) == -signal.SIGKILL
        st = ReleaseLog(world).current()
        assert (st.release_id, st.status, st.active) == (started.release_id, "canary", True)
        rate(world, cand, N)
        rate(world, "base", N)
        _wait(lambda: ReleaseLog(world).current().status == "full", 120, "the second did not finish it", logs)
        mine = [r for r in ReleaseLog(world).records() if r.action != "applied"]
        assert [(r.release_id, r.action, r.actor) for r in mine] == [
            (started.release_id, "start", ACTOR),
            (started.release_id, "full", "controller"),
        ]  # the same release, resumed: never restarted, never started twice
        _wait(lambda: read_status(world)["pid"] == second.pid, 30, "the second wrote no status", logs)
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0 and "autopilot: stopped" in logs[1].read_text()
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
