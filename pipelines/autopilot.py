"""The release autopilot: a service of ``flywheel up`` that releases gate-passed candidates with no person and no
CLI call. ``python -m pipelines.autopilot`` runs it in the foreground.

Every ``FLYWHEEL_RELEASE_POLL_S`` it looks once (``Autopilot.step``):

1. a release in progress whose candidate can no longer be served (tainted by a deletion, or its gate re-decided
   as failed) is rolled back at once;
2. the release in progress gets the controller's look (``Controller.tick``: publish a pending change, then
   promote, ramp, roll back or hold on the live ratings);
3. with no release in progress, the next candidate of ``pipelines.release_queue`` starts its canary: under
   ``FLYWHEEL_RELEASE_POLICY=auto`` the oldest gate-passed one, under ``approve`` the oldest one an operator
   approved (``flywheel releases approve <version> --token ...`` or the ops dashboard's Approve button).

So candidates go one at a time, in registered order; one that passes its gate while a release runs waits its
turn; a failed, tainted or never-decided one (its evaluation crashed) is held and never released.

Why a supervised service and not a Prefect deployment triggered by the train flow's result: the state of a
release is the release log, and a canary lasts minutes to hours. A service that polls the log and the registry
is crash-safe by construction: ``flywheel up`` restarts it when it dies, and the new process reads the log and
continues the canary at its stage. A run triggered by a train flow's completion fires once; a run that dies
mid-canary would need a second mechanism to be restarted, two candidates passing together would start two runs
that must then queue behind each other (polling again), and a release lasting hours would hold a work-pool slot
(the training pool runs one thing at a time). The poll also sees operators' approvals, pauses and manual
changes, which arrive at any time. Its cost is one registry query per look.

One autopilot per home: a second one waits on an exclusive lock (``releases/autopilot.lock``) that a killed
process releases, and every release change still goes through the controller's own lock, so the autopilot,
``flywheel releases ...`` commands and the ``release`` flow never interleave. Each look is written to
``releases/autopilot.json`` (policy, the release in progress, waiting and held candidates) for the dashboard.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from feedback.settings import Settings
from pipelines.config import ReleaseConfig
from pipelines.release import Controller, ReleaseError, ReleaseState
from pipelines.release_queue import Queue, build_queue

log = logging.getLogger("flywheel.autopilot")
ACTOR = "controller:autopilot"
STATUS = "autopilot.json"
LOCK = "autopilot.lock"


def read_status(settings: Settings) -> dict[str, Any] | None:
    """The autopilot's latest look, as it wrote it (None before its first)."""
    try:
        return json.loads((settings.home / "releases" / STATUS).read_text())
    except (OSError, ValueError):
        return None


class Autopilot:
    def __init__(
        self, settings: Settings, config: ReleaseConfig | None = None, say: Callable[[str], None] = log.info
    ) -> None:
        self.settings = settings
        self.cfg = config or ReleaseConfig()
        self.ctl = Controller(settings, self.cfg)
        self.say = say
        self._seen: dict[str, str] = {}  # version -> what was last said about it (each change is said once)
        self._last_look = ""

    # ---- one look -------------------------------------------------------------------------------------
    def step(self) -> ReleaseState | None:
        """Guard, tick, then start the next candidate when nothing is in progress. Returns the release state."""
        st = self.ctl.log.current()
        if st is not None and st.active and (why := self._unreleasable(st.candidate)):
            st = self.ctl.rollback(ACTOR, f"the candidate can no longer be served: {why}")
            self.say(f"rolled back {st.candidate}: {st.last.reason}")
        before = st
        st, a = self.ctl.tick()
        if st is not None and a is not None:
            look = f"{st.candidate} {st.status} {st.share:.0%}{' paused' if st.paused else ''}: {a.decision}"
            if look != self._last_look:
                self._last_look = look
                self.say(f"look: {look}: {'; '.join(a.reasons)}")
        if st is not None and before is not None and st.release_id == before.release_id:
            self._report_change(before, st)
        q = build_queue(self.settings, self.cfg.policy, self.ctl.log)
        self._report_queue(q)
        if st is None or not st.active:
            nxt = q.next()
            if nxt is not None:
                reason = (
                    f"approved by {nxt.approval.actor}" + (f": {nxt.approval.reason}" if nxt.approval.reason else "")
                    if nxt.approval is not None
                    else "gate passed: " + ("; ".join(nxt.gate_reasons) or "no reasons recorded")
                )
                st = self.ctl.start(nxt.version, ACTOR, f"policy {self.cfg.policy}; {reason}")
                self.say(
                    f"canary: {st.candidate} serves {st.share:.0%} of users (release {st.release_id}, "
                    f"production {st.production}; {reason})"
                )
                q = build_queue(self.settings, self.cfg.policy, self.ctl.log)
        self._write_status(st, q)
        return st

    def _unreleasable(self, version: str) -> str | None:
        """Why a candidate in canary must leave it now (tainted, or its gate re-decided as failed); None if fine.
        A registry that does not answer is not a reason: the plan in force stays."""
        from training import registry

        try:
            info = registry.get_version(self.settings, version)
        except KeyError as e:
            return str(e.args[0])
        except Exception as e:  # noqa: BLE001 - registry down: decide at the next look
            log.warning("autopilot: registry unavailable (%s); the release keeps its stage", e)
            return None
        if info.tainted:
            return f"{version} is tainted ({info.tainted_reason})"
        if info.gate == "failed":
            return f"{version} failed its gate ({'; '.join(info.gate_reasons)})"
        return None

    def _report_change(self, before: ReleaseState, st: ReleaseState) -> None:
        if (before.status, before.share) != (st.status, st.share):
            what = {"full": "full", "rolled_back": "rolled back", "ramping": "ramp"}.get(st.status, st.status)
            self.say(
                f"{what}: {st.candidate} at {st.share:.0%} of users (release {st.release_id}, "
                f"by {st.last.actor}): {st.last.reason}"
            )

    def _report_queue(self, q: Queue) -> None:
        for c in q.waiting:
            state = "approved" if c.approval else ("waiting for approval" if q.policy == "approve" else "waiting")
            if self._seen.get(c.version) != state:
                self._seen[c.version] = state
                self.say(
                    f"gate PASSED: {c.version} ({c.recipe} from {c.parent} on snapshot {c.snapshot_id}): {state}"
                    + (f" (by {c.approval.actor})" if c.approval else "")
                )
        for h in q.held:
            if self._seen.get(h.version) != h.why:
                self._seen[h.version] = h.why
                self.say(f"held: {h.version} will not be released: {h.why}")

    def _write_status(self, st: ReleaseState | None, q: Queue) -> None:
        path = self.settings.home / "releases" / STATUS
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "at": datetime.now(UTC).isoformat(),
            "pid": os.getpid(),
            "policy": q.policy,
            "production": q.production,
            "release": None
            if st is None
            else {
                "release_id": st.release_id,
                "candidate": st.candidate,
                "production": st.production,
                "status": st.status,
                "share": st.share,
                "paused": st.paused,
                "active": st.active,
            },
            "waiting": [c.model_dump(mode="json") for c in q.waiting],
            "held": [h.model_dump(mode="json") for h in q.held],
        }
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, path)

    # ---- the loop -------------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, max_s: float | None = None) -> None:
        """Look every ``poll_s`` until ``stop`` is set. Kafka, registry or warehouse trouble is logged and retried
        at the next look, never fatal: the plan in force stays what it was."""
        stop = stop or threading.Event()
        t0 = time.monotonic()
        while not stop.is_set():
            try:
                self.step()
            except ReleaseError as e:
                log.warning("autopilot: %s", e)
            except Exception as e:  # noqa: BLE001 - one bad look (a busy warehouse, MLflow restarting) is retried
                log.warning("autopilot: look failed (%s: %s); retrying in %.0f s", type(e).__name__, e, self.cfg.poll_s)
            if max_s is not None and time.monotonic() - t0 >= max_s:
                return
            stop.wait(self.cfg.poll_s)


def hold_lock(settings: Settings, stop: threading.Event) -> int | None:
    """One autopilot per home: wait for the exclusive lock (a killed holder releases it). The fd, or None if
    ``stop`` was set while waiting."""
    d = settings.home / "releases"
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    said = False
    while not stop.is_set():
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if not said:
                log.info("autopilot: another autopilot runs on %s; waiting for it to stop", settings.home)
                said = True
            stop.wait(1.0)
    os.close(fd)
    return None


def wait_for_mlflow(settings: Settings, stop: threading.Event, timeout_s: float) -> None:
    """Under ``flywheel up`` the MLflow server starts beside us, and its first start creates and migrates the
    store: a direct SQLite client migrating the same file at the same time breaks both. Wait for the server (or
    ``timeout_s``; after that the registry falls back to the store file, as everywhere else)."""
    from training import registry

    deadline = time.monotonic() + timeout_s
    said = False
    while not stop.is_set() and time.monotonic() < deadline:
        if registry.tracking_uri(settings) == registry.server_url(settings):
            return
        if not said:
            log.info("autopilot: waiting for the MLflow server at %s", registry.server_url(settings))
            said = True
        stop.wait(1.0)
    if not stop.is_set():
        log.warning("autopilot: no MLflow server after %.0f s; reading the registry's store file directly", timeout_s)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from feedback.settings import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    for noisy in ("httpx", "httpcore", "urllib3", "kafka"):  # every registry look and publish is not news
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(prog="python -m pipelines.autopilot", description="settings: FLYWHEEL_RELEASE_*")
    parser.add_argument(
        "--wait-for-mlflow", type=float, default=0.0, metavar="S", help="wait up to S s for the MLflow server first"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = ReleaseConfig()
    except ValidationError as e:
        err = e.errors()[0]
        field = "FLYWHEEL_RELEASE_" + str(err["loc"][0]).upper() if err["loc"] else "FLYWHEEL_RELEASE_*"
        print(f"autopilot: {field}: {err['msg']} (see pipelines/config.py ReleaseConfig)", file=sys.stderr)
        return 2
    settings = get_settings()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    fd = hold_lock(settings, stop)
    if fd is None:
        return 0
    try:
        if args.wait_for_mlflow > 0:
            wait_for_mlflow(settings, stop, args.wait_for_mlflow)
        log.info(
            "autopilot: policy %s, steps %s, a look every %.0f s (home %s)",
            cfg.policy,
            list(cfg.steps),
            cfg.poll_s,
            settings.home,
        )
        Autopilot(settings, cfg).run(stop)
    finally:
        os.close(fd)
    log.info("autopilot: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
