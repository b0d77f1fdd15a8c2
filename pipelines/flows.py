"""The project's Prefect flows: thin compositions of ``pipelines.tasks``.

- ``curate``: warehouse -> one immutable dataset snapshot (SFT, KTO, pairs, prompts; train/eval).
- ``volume_trigger``: when >= N new usable ratings arrived since the last snapshot, curate then ``train`` (queued
  on the ``train`` deployment's work pool when it exists, else run here), with the training defaults of
  ``training.defaults`` (through ``pipelines.training.TrainConfig``) either way.
- ``train``: snapshot -> recipe -> evaluate -> gate -> register (``pipelines.training``); returns the version, the
  gate verdict with its reasons, the evaluation and seconds per stage.
- ``release``: canary -> ramp -> full or rollback of one candidate on live ratings (``pipelines.release``), run
  by hand; in the running product ``pipelines.autopilot`` (a service of ``flywheel up``) does this by itself.
- ``ingest_health``: fails loudly when the continuous ingest consumer lags or stops committing.

Flows take no ``Settings`` parameter (deployments must serialise their parameters); they read the process's
``FLYWHEEL_*`` environment, and tests pass ``settings=`` explicitly when calling them in-process.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from feedback.settings import Settings, get_settings
from pipelines import tasks
from pipelines.annotation_report import write_report
from pipelines.config import TRAIN_DEPLOYMENT, CurateConfig, ReleaseConfig


@flow(name="curate", log_prints=True)
def curate(settings: Settings | None = None, config: CurateConfig | None = None) -> dict[str, Any]:
    settings = settings or get_settings()
    config = config or CurateConfig()
    src = tasks.read_warehouse(settings)
    curated = tasks.curate_tables(src, config)
    info = tasks.write_snapshot(curated, settings)
    tasks.register_snapshot(info, curated.watermark, settings)
    retired = tasks.retire_deleted(settings)
    tainted = tasks.taint_retired(settings)  # deletion reaches models trained on retired snapshots
    write_report(settings)  # the AI trainers' agreement and trust, for the ops page
    return {
        "snapshot_id": info.snapshot_id,
        "path": str(info.path),
        "created": info.created,
        "counts": info.manifest["counts"],
        "retired": [r["snapshot_id"] for r in retired],
        "tainted": tainted,
    }


@flow(name="train", log_prints=True)
def train(
    snapshot_id: str | None = None,
    recipe: str | None = None,
    parent: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    judge_overrides: list[str] | None = None,
    gate: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Train one candidate on a snapshot (default: the newest usable one) and gate it. Arguments left out come
    from ``FLYWHEEL_TRAIN_*`` (``pipelines.training.TrainConfig``); a retired snapshot, one with a pending
    deletion, an unknown parent or recipe, or a config typo stops the flow with one sentence before training.
    ``gate`` holds ``training.evaluate.GateConfig`` fields (thresholds, generation length)."""
    settings = settings or get_settings()
    cfg = tasks.train_config(recipe, parent, config, overrides, judge_overrides)
    sid = tasks.check_training_inputs(settings, snapshot_id, cfg)
    result = tasks.train_and_gate(settings, sid, cfg, gate)
    _publish_train_summary(result)
    return result


def _publish_train_summary(result: dict[str, Any]) -> None:
    """The result as a Prefect artifact (readable in the UI; its JSON block is what ``flywheel run train`` prints
    when the run happened on a worker, possibly on another machine)."""
    import json

    from prefect.artifacts import create_markdown_artifact

    gate = result["gate"]
    ev = result.get("eval", {})
    lines = [
        f"# {result['version']}: gate {'PASSED' if gate['passed'] else 'FAILED'}",
        "",
        f"recipe `{result['recipe']}` from `{result['parent']}` on snapshot `{result['snapshot_id']}`",
        "",
        *(f"- {r}" for r in gate["reasons"]),
        "",
        f"win rate {ev.get('win_rate')} (judge {ev.get('judge')}); stages {result['stages']}",
        "",
        "```json",
        json.dumps(result, default=str, indent=1),
        "```",
    ]
    create_markdown_artifact("\n".join(lines), key="train-result", description=f"train: {result['version']}")


@flow(name="volume-trigger", log_prints=True)
def volume_trigger(
    n: int | None = None,
    settings: Settings | None = None,
    config: CurateConfig | None = None,
    train_after: bool = True,
    train_overrides: list[str] | None = None,
) -> dict[str, Any]:
    """``train_after=False`` curates only; ``train_overrides`` go to the recipe when training runs here."""
    settings = settings or get_settings()
    config = config or CurateConfig()
    threshold = n if n is not None else config.volume_trigger_n
    new = tasks.count_new_ratings(settings)
    if new < threshold:
        return {"fired": False, "new_ratings": new, "threshold": threshold}
    print(f"trigger: {new} new usable ratings (threshold {threshold}): curating")
    snap = curate(settings=settings, config=config)  # fresh: it excludes every deleted user, never retired
    print(f"curate: snapshot {snap['snapshot_id']} {snap['counts']}")
    out = {"fired": True, "new_ratings": new, "threshold": threshold, "snapshot": snap, "train": None}
    if train_after:
        queued = tasks.submit_train(snap["snapshot_id"], settings)
        if queued:
            print(f"train: queued run {queued} on {TRAIN_DEPLOYMENT} (snapshot {snap['snapshot_id']})")
            out["train"] = {"queued": queued}
        else:
            print(f"train: no {TRAIN_DEPLOYMENT} deployment; training here on snapshot {snap['snapshot_id']}")
            out["train"] = train(snapshot_id=snap["snapshot_id"], overrides=train_overrides, settings=settings)
    return out


@flow(name="ingest-health")
def ingest_health(
    settings: Settings | None = None, config: CurateConfig | None = None, lag: dict[str, int] | None = None
) -> dict[str, Any]:
    """``lag`` (topic -> messages behind) replaces the broker query, for checks from a known state."""
    settings = settings or get_settings()
    config = config or CurateConfig()
    return tasks.check_ingest(settings, tasks.broker_lag(settings) if lag is None else lag, config)


@flow(name="release", log_prints=True)
def release(
    candidate: str | None = None,
    max_minutes: float = 120.0,
    settings: Settings | None = None,
    config: ReleaseConfig | None = None,
) -> dict[str, Any]:
    """Canary -> ramp -> full, or rollback (``pipelines.release``). Starts a release of ``candidate`` unless one is
    in progress, then looks every ``poll_s`` until it is decided or ``max_minutes`` pass; a run that died resumes
    the recorded release when started again (without a candidate)."""
    from pipelines.release import Controller

    settings = settings or get_settings()
    ctl = Controller(settings, config or ReleaseConfig())
    st = ctl.log.current()
    if candidate and (st is None or not st.active):
        st = ctl.start(candidate, "controller:flow", "release flow")

    def show(st, a) -> None:
        if st is not None and a is not None:
            print(f"{st.candidate} {st.status} {st.share:.0%}: {a.decision}: {'; '.join(a.reasons)}")

    st = ctl.run(max_s=max_minutes * 60, on_look=show)
    if st is None:
        return {"release": None}
    return {
        "release": st.release_id,
        "candidate": st.candidate,
        "production": st.production,
        "status": st.status,
        "share": st.share,
        "reason": st.last.reason,
    }


FLOWS = {
    "curate": curate,
    "volume-trigger": volume_trigger,
    "ingest-health": ingest_health,
    "train": train,
    "release": release,
}
