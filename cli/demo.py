"""``flywheel demo``: the product at a faster clock. It starts the same stack ``flywheel up`` starts, lets simulated
users chat, and waits while the STACK curates, trains, gates and releases by itself; then it prints what the
stack did and what changed for held-out users.

    flywheel demo                      # progress on stderr, a summary at the end
    flywheel demo --json               # one JSON object (benchmarks/results/demo.json holds a measured one)
    flywheel demo --recipe rlhf        # the stack trains a reward model from the users' pairs, then RLOO (beta > 0)

What happens: ``flywheel up`` runs as a child (``cli/demo_stack.py``) in a private FLYWHEEL_HOME with its own
ports, with small thresholds set through its settings (``stack_env``: the volume trigger's threshold and check
interval, the release steps, ratings per arm and timeout, release policy ``auto``, the training recipe). Training
users (train prompts) chat through the public API until the stack's volume trigger fires; the stack curates,
queues the ``train`` deployment, its worker trains and gates; the autopilot starts a canary of a gate-passed
candidate; held-out users (held-out prompts, no consent: their ratings never train and never count toward the
trigger) chat through the same API concurrently until the autopilot decides full or rollback. Then the demo stops
everything (``flywheel up``'s own shutdown, then ``flywheel down``) and checks that no process or port is left.
The demo calls no stage: it reads Prefect's flow runs, the release log and the registry. ``autonomous`` is true
only when each stage that applies (trigger, curate, train, gate, and for a passed gate canary and decision) is
on record as done by the stack.

Default sizes (for a quiet 2-core CPU; about 15-20 minutes in all):
- 12 training users at 40 tokens gave ~60-70 usable ratings a minute (543 in 8 minutes, the previous demo), so
  the trigger at 360 fires after ~6 minutes, with enough liked answers, comparisons and regenerations for SFT
  rows, judge pairs and >= 4 held-out prompts (a quarter of conversations held out). 40 tokens keeps a turn near
  2 s and most answers inside the concise users' 25-40 word limit.
- The trigger looks every 30 s: each look is a served flow run, a Python process that imports the pipelines
  (5-10 s of CPU), so looking every 5 s would take a core from the users it waits for.
- The canary gives the candidate half of 10 held-out users; 20 ratings per arm is the least the controller
  decides on (the previous demo decided ~1-2 minutes into the canary); 5 minutes is its timeout, after which the
  autopilot rolls back.
- Training uses the one table of defaults (``training.defaults``) unless ``--set`` replaces its row; the gate its
  own defaults unless ``--gate`` changes them. ``--timeout-minutes`` bounds the whole run.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cli.demo_stack import (
    FlowRuns,
    StackError,
    UpProcess,
    describe_run,
    final,
    private_settings,
    stack_ports,
)
from cli.demo_users import Crowd
from cli.simulate import SimConfig
from feedback.settings import Settings, get_settings

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("sft", "dpo", "kto", "rlhf")
POLL_S = 5.0
# Held-out people come back as new visitors every few questions, so the canary's share of them follows the
# release's weight however few people there are (``SimConfig.questions_per_visit``).
HELDOUT_QUESTIONS_PER_VISIT = 3
LOG_GRACE_S = 30.0  # how long a finished run's last log lines may take to reach Prefect's API
VERDICT = re.compile(r"\[train\] (\S+) gate (PASSED|FAILED)")  # the line pipelines.training logs with the verdict
FIELDS = (  # every key of the --json object, present (None where it does not apply) whatever happened
    "home recipe config autonomous stages timeline simulate heldout ingested snapshot train gate release_decision "
    "release_reason thumbs_up_before thumbs_up_after thumbs_up_before_ci thumbs_up_after_ci n_before n_after p_value "
    "p_value_sequential diff_always_valid_ci production candidate decided accuracy_before accuracy_after "
    "accuracy_before_ci accuracy_after_ci accuracy_diff_ci accuracy_p_value accuracy_n_before accuracy_n_after "
    "utility_before utility_after utility_diff_ci utility_p_value mean_words_before mean_words_after "
    "mean_words_diff_ci length_controlled_win_rate judge_length_corr parent_path candidate_path stop seconds cycle_s "
    "ports error"
).split()


@dataclass(frozen=True)
class DemoConfig:
    train_users: int = 12
    train_minutes: float = 10.0  # at most: they stop as soon as the stack's trigger fires
    trigger_ratings: int = 360
    check_interval_s: int = 30
    eval_users: int = 10
    eval_minutes: float = 5.0
    max_tokens: int = 40
    recipe: str = "sft"
    overrides: tuple[str, ...] = ()  # empty: the recipe's row of training.defaults (what `flywheel up` trains)
    judge_overrides: tuple[str, ...] = ()
    gate: dict[str, Any] = field(default_factory=dict)  # training.gate_config.GateConfig fields
    canary_share: float = 0.5
    min_thumbs: int = 20
    release_margin: float = 0.05  # the controller's "not worse by" margin (ReleaseConfig.margin)
    seed: int = 1
    eval_fraction: float = 0.25  # of conversations held out: the gate needs >= 4 held-out prompts
    timeout_minutes: float = 45.0


@dataclass
class Run:
    """Timing and progress of one demo."""

    quiet: bool
    seconds: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)
    wall0: float = field(default_factory=time.time)

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(f"[demo {time.monotonic() - self.t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    def since(self, epoch: float | None) -> float | None:
        return None if epoch is None else round(epoch - self.wall0, 1)

    def left(self, cfg: DemoConfig) -> float:
        return cfg.timeout_minutes * 60 - (time.monotonic() - self.t0)


# ---------------------------------------------------------------------------------------------------------
# The stack's world and settings
# ---------------------------------------------------------------------------------------------------------
def release_settings(cfg: DemoConfig) -> dict[str, Any]:
    """The autopilot's release settings at the demo's clock (``pipelines.config.ReleaseConfig`` fields)."""
    return {
        "policy": "auto",
        "steps": (cfg.canary_share, 1.0),
        "min_thumbs": cfg.min_thumbs,
        "margin": cfg.release_margin,
        "min_step_s": 0.0,
        "max_step_s": cfg.eval_minutes * 60,
        "on_timeout": "rollback",
        "poll_s": POLL_S,
    }


def stack_env(settings: Settings, cfg: DemoConfig) -> dict[str, str]:
    """``flywheel up``'s environment: the private settings plus the demo's thresholds, all as FLYWHEEL_* variables
    (inherited FLYWHEEL_CURATE_/RELEASE_/TRAIN_ ones are dropped, so a run depends on its options only, and
    PREFECT_* ones, so the stack's services talk to the stack's own Prefect server)."""
    env = {
        k: v
        for k, v in settings.child_env(REPO).items()
        if not k.startswith(("FLYWHEEL_CURATE_", "FLYWHEEL_RELEASE_", "FLYWHEEL_TRAIN_", "PREFECT_"))
    }
    env.update(
        {
            "FLYWHEEL_CURATE_VOLUME_TRIGGER_N": str(cfg.trigger_ratings),
            "FLYWHEEL_CURATE_VOLUME_CHECK_INTERVAL_S": str(cfg.check_interval_s),
            "FLYWHEEL_CURATE_EVAL_FRACTION": str(cfg.eval_fraction),
            "FLYWHEEL_TRAIN_RECIPE": cfg.recipe,
        }
    )
    for k, v in release_settings(cfg).items():
        env[f"FLYWHEEL_RELEASE_{k.upper()}"] = json.dumps(list(v)) if isinstance(v, tuple) else str(v)
    if cfg.overrides:
        env["FLYWHEEL_TRAIN_OVERRIDES"] = json.dumps(list(cfg.overrides))
    if cfg.judge_overrides:
        env["FLYWHEEL_TRAIN_JUDGE_OVERRIDES"] = json.dumps(list(cfg.judge_overrides))
    if cfg.gate:
        env["FLYWHEEL_TRAIN_GATE"] = json.dumps(cfg.gate)
    return env


# ---------------------------------------------------------------------------------------------------------
# Phases: each waits for the stack, none does a stage
# ---------------------------------------------------------------------------------------------------------
def _wait(run: Run, cfg: DemoConfig, up: UpProcess, what: str) -> None:
    if not up.alive():
        raise StackError(f"`flywheel up` stopped while {what}: {up.tail()}")
    if run.left(cfg) <= 0:
        raise StackError(f"timed out after {cfg.timeout_minutes:g} minutes while {what} (--timeout-minutes)")
    time.sleep(POLL_S)


def until_trigger(run: Run, cfg: DemoConfig, up: UpProcess, runs: FlowRuns, settings: Settings) -> tuple[Any, Any]:
    """Training users chat until the stack's volume trigger starts a curation; (their crowd, the curate run)."""
    from pipelines.triggers import new_usable_ratings

    users = SimConfig(
        users=cfg.train_users,
        max_tokens=cfg.max_tokens,
        consent_rate=0.95,
        compare_rate=0.5,
        regenerate_rate=0.5,
        withdraw_rate=0.05,
        prompts="train",
        seed=cfg.seed,
        minutes=cfg.train_minutes,
    )
    crowd = Crowd(up.url, users, cfg.train_minutes * 60).start()
    run.say(f"{cfg.train_users} training users chat; the stack curates at {cfg.trigger_ratings} usable ratings")
    import pipelines.autopilot  # noqa: F401 - imported now (seconds of scipy), not when the canary starts
    import pipelines.release_log  # noqa: F401

    last_note, idle_since = time.monotonic(), None
    try:
        while not (curate := runs.runs("curate", started_by_a_flow=True)):
            if time.monotonic() - last_note >= 30:
                last_note = time.monotonic()
                run.say(f"usable ratings in the warehouse: {new_usable_ratings(settings.warehouse_path)}")
            if crowd.done():
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > cfg.check_interval_s * 2 + 60:
                    n = new_usable_ratings(settings.warehouse_path)
                    raise StackError(
                        f"the stack's volume trigger did not fire: {n} usable ratings after {cfg.train_minutes:g} "
                        f"minutes, threshold {cfg.trigger_ratings}: give more --train-minutes or lower "
                        "--trigger-ratings"
                    )
            _wait(run, cfg, up, "waiting for the volume trigger")
    except BaseException:
        crowd.finish()
        raise
    run.say(f"the stack's volume trigger fired: curate run {curate[0].name}; training users stop")
    return crowd, curate[0]


def until_gated(run: Run, cfg: DemoConfig, up: UpProcess, runs: FlowRuns, curate: Any) -> tuple[Any, Any, Any]:
    """Wait for the curate run, then the ``train`` run the trigger queued on the worker, until it logs its gate
    verdict (the autopilot may start the canary at once); its log lines are shown as they come. Returns the
    curate run, the train run and the verdict line's match (the candidate's name, PASSED or FAILED)."""
    while not final(curate := runs.client.read_flow_run(curate.id)):
        _wait(run, cfg, up, "the stack curates")
    if curate.state_type.value != "COMPLETED":
        raise StackError(f"the stack's curate run {curate.name} ended {curate.state_name}: see {up.s.home}/logs")
    run.say(f"curated ({describe_run(curate)['seconds']}s); waiting for the train run the trigger queues")
    train, shown, verdict, ended = None, 0, None, None
    while verdict is None:
        if train is None:
            queued = [r for r in runs.runs("train") if r.deployment_id is not None]
            train = queued[0] if queued else None
        if train is not None:
            train = runs.client.read_flow_run(train.id)
            ended = ended or (time.monotonic() if final(train) else None)
            for _, line in runs.logs(train.id, shown):
                shown += 1
                run.say(f"  train | {line[:200]}")
                verdict = verdict or VERDICT.match(line)
            # A run's last log lines reach Prefect's API a few seconds after its final state (the worker sends logs
            # in batches), so a completed run without a verdict yet gets LOG_GRACE_S before it counts as failed.
            if ended is not None and (
                train.state_type.value != "COMPLETED" or (verdict is None and time.monotonic() - ended > LOG_GRACE_S)
            ):
                raise StackError(f"the stack's train run {train.name} ended {train.state_name}: see the lines above")
        if verdict is None:
            _wait(run, cfg, up, "the stack trains and gates")
    return curate, train, verdict


def until_decided(run: Run, cfg: DemoConfig, up: UpProcess, settings: Settings, version: str) -> dict[str, Any]:
    """Wait for the autopilot's canary of ``version``, drive held-out users through the API meanwhile, and stop them
    once it decided (full or rollback). Returns the release state and the held-out users' measurements."""
    from pipelines.autopilot import read_status
    from pipelines.release_log import ReleaseLog

    log = ReleaseLog(settings)
    t = time.monotonic()
    while (st := log.current()) is None or st.candidate != version:
        if time.monotonic() - t > 120 + 4 * POLL_S:
            held = (read_status(settings) or {}).get("held")
            raise StackError(f"the autopilot did not start a canary of {version} within 2 minutes (held: {held})")
        _wait(run, cfg, up, "waiting for the autopilot's canary")
    run.say(f"autopilot: canary of {version}, {st.share:.0%} of users (production {st.production}); held-out users")
    users = SimConfig(
        users=cfg.eval_users,
        max_tokens=cfg.max_tokens,
        consent_rate=0.0,
        compare_rate=0.0,
        regenerate_rate=0.0,
        prompts="heldout",
        seed=cfg.seed + 1000,
        user_prefix="heldout",
        minutes=cfg.eval_minutes,
        questions_per_visit=HELDOUT_QUESTIONS_PER_VISIT,
    )
    crowd = Crowd(up.url, users, cfg.eval_minutes * 60 + 120).start()
    seen = len(log.records())
    try:
        while (st := log.current()).active:
            for r in log.records()[seen:]:
                seen += 1
                if r.action != "applied":
                    run.say(f"  release | {r.action} by {r.actor}: {r.candidate} at {r.share:.0%}: {r.reason[:160]}")
            _wait(run, cfg, up, "the autopilot decides")
    finally:
        heldout, words = crowd.finish()
    run.say(f"release decided: {st.status} ({st.last.reason[:160]})")
    time.sleep(3)  # the last ratings reach Kafka and the warehouse
    return {"state": st, "heldout": heldout, "words": words}


def run_demo(cfg: DemoConfig, home: Path, quiet: bool = False) -> dict[str, Any]:
    from cli.demo_report import report
    from infra.prefect_server import api_url
    from pipelines.config import ReleaseConfig

    run = Run(quiet)
    settings = private_settings(home, get_settings())
    out: dict[str, Any] = dict.fromkeys(FIELDS)
    out |= {"home": str(settings.home), "recipe": cfg.recipe, "config": asdict(cfg), "autonomous": False}
    out["ports"] = stack_ports(settings)
    up = UpProcess(settings, stack_env(settings, cfg), run.say)
    runs: FlowRuns | None = None
    train = None
    release_cfg = ReleaseConfig(**release_settings(cfg))
    t = time.monotonic()
    try:
        run.say(f"starting the stack (`flywheel up`) in {settings.home}")
        up.start(timeout_s=max(60.0, min(900.0, run.left(cfg))))
        run.seconds["start"] = round(time.monotonic() - t, 1)
        run.say(f"stack up in {run.seconds['start']:.0f}s: app {up.url}, Prefect {api_url(settings)}")
        runs = FlowRuns(api_url(settings))
        t = time.monotonic()
        crowd, curate = until_trigger(run, cfg, up, runs, settings)
        sim, _ = crowd.finish()
        out["simulate"] = {k: v for k, v in sim.as_dict().items() if k not in ("per_version", "per_user")}
        run.seconds["simulate"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        curate, train, verdict = until_gated(run, cfg, up, runs, curate)
        run.seconds["trigger_to_gate"] = round(time.monotonic() - t, 1)
        rel = None
        if verdict.group(2) == "PASSED":
            t = time.monotonic()
            rel = until_decided(run, cfg, up, settings, verdict.group(1))
            run.seconds["canary"] = round(time.monotonic() - t, 1)
        else:
            run.say(f"gate FAILED for {verdict.group(1)}: the autopilot holds it")
        while not final(train := runs.client.read_flow_run(train.id)):
            _wait(run, cfg, up, "the train run finishes")
        run.seconds["curate"] = describe_run(curate)["seconds"] or 0.0
        run.seconds["train"] = describe_run(train)["seconds"] or 0.0
        out |= report(run.since, release_cfg, settings, runs, curate, train, rel)
    except StackError as e:  # the stack did not do its part: say what, stop it all, report what was done
        out["error"] = str(e)
        run.say(f"FAILED: {e}")
        if train is not None and runs is not None:
            try:
                out |= report(run.since, release_cfg, settings, runs, curate, train, None)
            except Exception as e2:  # noqa: BLE001 - the first failure is the one to report
                run.say(f"(no report of what was done: {type(e2).__name__}: {e2})")
    finally:
        if runs is not None:
            runs.close()
        t = time.monotonic()
        run.say("stopping the stack")
        out["stop"] = up.stop()
        run.seconds["stop"] = round(time.monotonic() - t, 1)
        if out["stop"]["leftovers"]:
            run.say(f"LEFT RUNNING: {out['stop']['leftovers']}")
    out["seconds"] = run.seconds
    out["cycle_s"] = round(time.monotonic() - run.t0, 1)
    return out
