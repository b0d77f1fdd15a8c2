"""The release controller: a gate-passed candidate goes to canary, ramps up on live ratings, and reaches full
traffic or is rolled back.

Stages are ``ReleaseConfig.steps`` (candidate's share of users: e.g. 0.1 -> 0.5 -> 1.0). At each look
``pipelines.analysis`` decides promote / rollback / continue on the traffic since the release began; a manual
``promote``, ``rollback`` or ``pause`` (operators, with the admin token) does the same by hand.

Every change is:
- published to the compacted ``releases`` topic (``app.router.publish_plan``) with the release's own salt, so
  each release draws a different set of canary users, and the app follows it within about a second;
- recorded in ``$FLYWHEEL_HOME/releases/log.jsonl`` (append-only, fsynced; ``pipelines.release_log``): who or
  what decided, why, the statistics at that moment, the plan. The state of the current release is a fold over
  that log, so a controller that dies mid-ramp resumes exactly where it was;
- mirrored as MLflow aliases (``canary``, ``production``) through ``training.registry``.

Safety: a change is written as *pending* before it is published and marked *applied* after the broker acknowledged
it. If Kafka is down the plan in force stays what it was (the app keeps serving it, never "nothing"); the pending
change is re-published by the next controller tick or command. A plan only ever names versions that exist on
disk and (for candidates) passed their gate and are not tainted (``training.registry.promotable``). Two operators
(or an operator and the controller) are serialised by an exclusive file lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from app.router import ReleasePlan, publish_plan
from feedback.events import new_id
from feedback.settings import Settings
from pipelines import analysis
from pipelines.config import ReleaseConfig
from pipelines.release_log import (  # noqa: F401 - re-exported: callers import the log's names from here
    ACTIVE,
    LOCK_TIMEOUT_S,
    Action,
    Record,
    ReleaseError,
    ReleaseLog,
    ReleaseState,
    Status,
    fold,
    latest_analysis,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Checks against the registry and the disk
# ---------------------------------------------------------------------------------------------------------
def servable(settings: Settings, version: str) -> bool:
    """Weights the app can load for this version exist (a model directory, or an entry in backends.yaml)."""
    if version == settings.model_version or (settings.models_dir / version / "config.json").exists():
        return True
    try:
        from app.backends.registry import backend_config

        return version in backend_config(settings)
    except ValueError:
        return False


def check_candidate(settings: Settings, version: str) -> None:
    """Refuse unknown, unservable, gate-failed or tainted versions, with the reason."""
    from training import registry

    if not registry.NAME_RE.match(version):
        raise ReleaseError(f"{version!r} is not a model version name (like dpo-0003); see `flywheel models list`")
    ok, why = registry.promotable(settings, version)
    if not ok:
        raise ReleaseError(f"refused: {why}")
    if not servable(settings, version):
        raise ReleaseError(f"refused: no weights for {version} under {settings.models_dir}; nothing could serve it")


def current_production(settings: Settings, log_: ReleaseLog) -> str:
    """What serves everyone now: the outcome of the latest release, else the registry's alias, else the base."""
    cur = log_.current()
    if cur is not None:
        return cur.serving if not cur.active else cur.production
    try:
        from training import registry

        return registry.get_alias(settings, "production") or settings.model_version
    except Exception:  # noqa: BLE001 - registry down: the base release is what the app serves by default
        return settings.model_version


def _broker_reachable(settings: Settings, timeout_s: float = 2.0) -> None:
    """Fail fast (instead of a client's long bootstrap wait) when no bootstrap server accepts a connection."""
    for server in settings.bootstrap_servers:
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
                return
        except (OSError, ValueError):
            continue
    raise ConnectionError(f"no Kafka bootstrap server answers ({settings.kafka_bootstrap})")


# ---------------------------------------------------------------------------------------------------------
# The controller
# ---------------------------------------------------------------------------------------------------------
def plan_for(candidate: str, production: str, share: float, salt: str, stage: str) -> ReleasePlan:
    """Incumbent first, candidate last (monotone ramps, see ``app.router``)."""
    if share >= 1.0:
        return ReleasePlan.single(candidate, stage=stage, salt=salt)
    if share <= 0.0:
        return ReleasePlan.single(production, stage=stage, salt=salt)
    return ReleasePlan.weighted({production: round(1 - share, 6), candidate: round(share, 6)}, stage=stage, salt=salt)


class Controller:
    """Release actions. Every public method takes the lock, so operators and the controller never interleave."""

    def __init__(self, settings: Settings, config: ReleaseConfig | None = None):
        self.settings = settings
        self.cfg = config or ReleaseConfig()
        self.log = ReleaseLog(settings)

    # ---- helpers (called under the lock) --------------------------------------------------------------
    def _change(
        self,
        st: ReleaseState | None,
        *,
        action: Action,
        actor: str,
        reason: str,
        share: float,
        status: Status,
        stats: dict[str, Any] | None = None,
        candidate: str | None = None,
        production: str | None = None,
        salt: str | None = None,
        release_id: str | None = None,
    ) -> Record:
        cand = candidate or st.candidate  # type: ignore[union-attr]
        prod = production or st.production  # type: ignore[union-attr]
        salt = salt if salt is not None else st.salt  # type: ignore[union-attr]
        stage = {"full": "full", "rolled_back": "rollback"}.get(status, f"{status}-{share:g}")
        plan = plan_for(cand, prod, share, salt, f"{stage} {cand}")
        missing = [v for v in plan.versions() if not servable(self.settings, v)]
        if missing:
            raise ReleaseError(f"refused: the plan would name {missing}, which nothing can serve")
        rec = self.log.append(
            release_id=release_id or st.release_id,
            action=action,
            actor=actor,
            reason=reason,  # type: ignore[union-attr]
            candidate=cand,
            production=prod,
            share=share,
            status=status,
            paused=False,
            plan=json.loads(plan.model_dump_json()),
            applied=False,
            stats=stats,
        )
        self._apply(rec)
        return rec

    def _apply(self, rec: Record) -> None:
        """Publish a recorded plan and mark it applied; on failure it stays pending (and the old plan in force)."""
        plan = ReleasePlan.model_validate(rec.plan)
        try:
            _broker_reachable(self.settings)
            publish_plan(self.settings, plan, timeout=self.cfg.publish_timeout_s)
        except Exception as e:  # noqa: BLE001 - Kafka down or slow: keep the old plan, retry later
            raise ReleaseError(
                f"recorded but NOT yet published ({type(e).__name__}: {e}): users keep the plan in force; "
                "the controller (or the next command) publishes it when Kafka answers"
            ) from e
        self.log.append(
            release_id=rec.release_id,
            action="applied",
            actor=rec.actor,
            reason=f"plan {plan.plan_id}",
            candidate=rec.candidate,
            production=rec.production,
            share=rec.share,
            status=rec.status,
            paused=rec.paused,
        )
        self._mirror_aliases(rec)

    def _mirror_aliases(self, rec: Record) -> None:
        try:
            from training import registry

            if rec.status == "full":
                registry.set_alias(self.settings, "production", rec.candidate)
                registry.delete_alias(self.settings, "canary")
            elif rec.status == "rolled_back":
                registry.delete_alias(self.settings, "canary")
            else:
                registry.set_alias(self.settings, "canary", rec.candidate)
        except Exception as e:  # noqa: BLE001 - the plan is what users see; the registry mirror is retried later
            log.warning("could not mirror release %s as registry aliases: %s", rec.release_id, e)

    def _resume_pending(self) -> ReleaseState | None:
        st = self.log.current()
        if st is not None and st.pending is not None:
            log.info("re-publishing pending release change #%d (%s)", st.pending.seq, st.pending.action)
            self._apply(st.pending)
            st = self.log.current()
        return st

    def _active(self) -> ReleaseState:
        st = self._resume_pending()
        if st is None or not st.active:
            raise ReleaseError("no release in progress: start one with `flywheel releases start <version>`")
        return st

    # ---- actions ---------------------------------------------------------------------------------------
    def start(self, candidate: str, actor: str, reason: str = "") -> ReleaseState:
        with self.log.locked():
            st = self._resume_pending()
            if st is not None and st.active:
                raise ReleaseError(
                    f"release {st.release_id} of {st.candidate} is in progress ({st.status} "
                    f"{st.share:.0%}): roll it back or let it finish first"
                )
            check_candidate(self.settings, candidate)
            production = current_production(self.settings, self.log)
            if candidate == production:
                raise ReleaseError(f"{candidate} already serves everyone")
            share = self.cfg.steps[0]
            self._change(
                None,
                action="start",
                actor=actor,
                reason=reason or "gate passed",
                share=share,
                status="full" if share >= 1.0 else "canary",
                stats={"step_index": 0},
                candidate=candidate,
                production=production,
                salt=new_id(),
                release_id=new_id()[:12],
            )
            started = self.log.current()
        self._write_system_card(candidate)
        return started  # type: ignore[return-value]

    def _write_system_card(self, version: str) -> None:
        """The released version's system card (``training/system_card.py``); a failure is logged, never a release
        stopped: the card describes the release, it does not gate it."""
        from training.system_card import write_card

        try:
            write_card(self.settings, version)
        except Exception as e:
            log.warning("system card of %s not written: %s", version, e)

    def promote(
        self, actor: str, reason: str = "", full: bool = False, stats: dict[str, Any] | None = None
    ) -> ReleaseState:
        """Next ramp step (or straight to full)."""
        with self.log.locked():
            return self._promote(self._active(), actor, reason, full, stats)

    def _promote(
        self, st: ReleaseState, actor: str, reason: str, full: bool, stats: dict[str, Any] | None
    ) -> ReleaseState:
        steps = self.cfg.steps
        nxt = len(steps) - 1 if full else min(st.step_index + 1, len(steps) - 1)
        share = 1.0 if full else max(steps[nxt], st.share)
        status: Status = "full" if share >= 1.0 else "ramping"
        self._change(
            st,
            action="full" if status == "full" else "ramp",
            actor=actor,
            reason=reason,
            share=share,
            status=status,
            stats={**(stats or {}), "step_index": nxt},
        )
        return self.log.current()  # type: ignore[return-value]

    def rollback(self, actor: str, reason: str = "", stats: dict[str, Any] | None = None) -> ReleaseState:
        with self.log.locked():
            st = self._active()
            self._change(
                st,
                action="rollback",
                actor=actor,
                reason=reason or "manual rollback",
                share=0.0,
                status="rolled_back",
                stats=stats,
            )
            return self.log.current()  # type: ignore[return-value]

    def pause(self, actor: str, reason: str = "", paused: bool = True) -> ReleaseState:
        """Stop (or restart) automatic decisions; the plan in force stays as it is."""
        with self.log.locked():
            st = self._active()
            self.log.append(
                release_id=st.release_id,
                action="pause" if paused else "resume",
                actor=actor,
                reason=reason,
                candidate=st.candidate,
                production=st.production,
                share=st.share,
                status=st.status,
                paused=paused,
            )
            return self.log.current()  # type: ignore[return-value]

    def analyse(self, st: ReleaseState) -> analysis.Analysis:
        cand, prod = analysis.read_arms(
            self.settings.warehouse_path,
            st.candidate,
            st.production,
            st.started_at,
            self.settings.warehouse_lock_timeout_s,
        )
        elapsed = (datetime.now(UTC) - st.stage_started_at).total_seconds()
        return analysis.analyse(cand, prod, self.cfg, elapsed)

    def tick(self) -> tuple[ReleaseState | None, analysis.Analysis | None]:
        """One look: publish anything pending, then act on the analysis (unless paused). Safe to call anytime."""
        with self.log.locked():
            st = self._resume_pending()
            if st is None or not st.active:
                return st, None
            a = self.analyse(st)
            self._save_latest(st, a)
            if st.paused:
                return st, a
            stats = a.as_dict()
            if a.decision == "rollback":
                self._change(
                    st,
                    action="rollback",
                    actor="controller",
                    reason="; ".join(a.reasons),
                    share=0.0,
                    status="rolled_back",
                    stats=stats,
                )
            elif a.decision == "promote":
                self._promote(st, "controller", "; ".join(a.reasons), False, stats)
            elif a.decision == "hold" and not st.paused:
                self.log.append(
                    release_id=st.release_id,
                    action="pause",
                    actor="controller",
                    reason="; ".join(a.reasons),
                    candidate=st.candidate,
                    production=st.production,
                    share=st.share,
                    status=st.status,
                    paused=True,
                    stats=stats,
                )
            return self.log.current(), a

    def _save_latest(self, st: ReleaseState, a: analysis.Analysis) -> None:
        """The latest look, for the dashboard and `releases show` (overwritten atomically each tick)."""
        path = self.log.dir / "latest_analysis.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"release_id": st.release_id, "at": datetime.now(UTC).isoformat(), **a.as_dict()}, default=str)
        )
        os.replace(tmp, path)

    def run(
        self,
        until_done: bool = True,
        max_s: float | None = None,
        on_look: Callable[[ReleaseState | None, analysis.Analysis | None], None] | None = None,
    ) -> ReleaseState | None:
        """Look every ``poll_s`` until the release is over (or ``max_s``). Kafka trouble is retried, not fatal."""
        t0 = time.monotonic()
        while True:
            try:
                st, a = self.tick()
            except ReleaseError as e:
                log.warning("release controller: %s", e)
                st, a = self.log.current(), None
            if on_look is not None:
                on_look(st, a)
            if st is None or not st.active or not until_done:
                return st
            if max_s is not None and time.monotonic() - t0 >= max_s:
                return st
            time.sleep(self.cfg.poll_s)
