"""``flywheel demo``: one measured turn of the loop on this machine, from simulated thumbs to a better model.

    flywheel demo                 # progress on stderr, a summary at the end
    flywheel demo --json          # one JSON object (benchmarks/results/demo.json holds a measured one)

Stages, each timed: start a private stack (Kafka broker, the app server, all under a fresh FLYWHEEL_HOME that
reuses the base model read-only) -> simulate (training users with hidden tastes chat and rate through the public
API) -> ingest (Kafka -> DuckDB, exactly once) -> curate (the ``curate`` flow) -> train + evaluate + gate (the
lead's ``train`` flow, recipe configurable) -> canary (the release controller publishes a plan; held-out users,
who never asked the training prompts, chat through the same API while the controller decides on their ratings)
-> promote or rollback.

What it prints: the held-out users' thumbs-up rate on production (before) and on the candidate (after) over the
same, concurrent canary traffic, Wilson 95% intervals, and the two-sided p-value of the difference (a single
look after the fact; the controller itself decided with the always-valid sequential test of
``pipelines.analysis``).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import typer

from cli.simulate import SimConfig, SimStats, run_simulation
from feedback.settings import Settings, get_settings
from training.defaults import RECIPE_DEFAULTS  # what each recipe runs with when no --set is given (measured)

REPO = Path(__file__).resolve().parents[1]
SET_OPTION = typer.Option(
    None, "--set", help="Recipe config override key=value (repeatable; replaces the recipe's demo defaults)."
)


@dataclass(frozen=True)
class DemoConfig:
    train_users: int = 12
    train_minutes: float = 8.0
    eval_users: int = 8
    eval_minutes: float = 5.0
    max_tokens: int = 40
    recipe: str = "sft"
    overrides: tuple[str, ...] = RECIPE_DEFAULTS["sft"]
    canary_share: float = 0.5
    min_thumbs: int = 20
    seed: int = 1
    eval_fraction: float = 0.25  # of conversations held out: the gate needs >= 4 held-out prompts from one demo


@dataclass
class Run:
    """Timing and progress of one demo."""

    quiet: bool
    seconds: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(f"[demo {time.monotonic() - self.t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.say(f"{name} ...")
        t = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - t, 1)
            self.say(f"{name} done in {self.seconds[name]:.0f}s")


# ---------------------------------------------------------------------------------------------------------
# A private stack
# ---------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_settings(home: Path, parent: Settings) -> Settings:
    """A world of its own: fresh home, broker and app ports, MLflow store; the parent's base model, read-only."""
    from pydantic import SecretStr

    return Settings(
        home=home,
        kafka_bootstrap=f"127.0.0.1:{_free_port()}",
        kafka_controller_port=_free_port(),
        app_port=_free_port(),
        mlflow_port=_free_port(),
        prefect_port=_free_port(),
        base_model=str(parent.base_model_path.resolve()),
        admin_token=SecretStr(secrets.token_urlsafe(24)),
        model_version=parent.model_version,
    )


class Stack:
    """The broker and the app server as child processes of the demo; stopped at the end, whatever happens."""

    def __init__(self, settings: Settings, run: Run):
        self.s = settings
        self.run = run
        self.app: subprocess.Popen | None = None
        self.url = f"http://{settings.app_host}:{settings.app_port}"

    def __enter__(self) -> Stack:
        from infra import kafka_local

        kafka_local.start(self.s, quiet=True)
        self.run.say(f"broker on {self.s.kafka_bootstrap}")
        log = open(self.s.home / "app.log", "ab")  # noqa: SIM115 - handed to the child
        self.app = subprocess.Popen(
            [sys.executable, "-m", "app.server"],
            cwd=REPO,
            env=self.s.child_env(REPO),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        # A real Prefect server for the flows (the ephemeral one gives up after 20 s on a busy machine).
        from infra import prefect_server

        prefect_server.start(self.s, timeout_s=600)
        self.run.say(f"prefect on {prefect_server.api_url(self.s)}")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.app.poll() is not None:
                raise RuntimeError(f"the app server exited ({self.app.returncode}); see {self.s.home / 'app.log'}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    self.run.say(f"app on {self.url}")
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"the app server did not answer within 300 s; see {self.s.home / 'app.log'}")

    def __exit__(self, *exc) -> None:
        from infra import kafka_local, prefect_server

        prefect_server.stop(self.s)
        if self.app is not None and self.app.poll() is None:
            self.app.terminate()
            try:
                self.app.wait(30)
            except subprocess.TimeoutExpired:
                self.app.kill()
        kafka_local.stop(self.s)


# ---------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------
def ingest_until(settings: Settings, turns: int, feedback: int, max_s: float = 300.0) -> dict[str, int]:
    from feedback.ingest import IngestConsumer

    st = IngestConsumer(settings).run(  # run() closes the consumer and the warehouse when it returns
        max_seconds=max_s,
        stop_when=lambda s: s.inserted.get("turns", 0) >= turns and s.inserted.get("feedback", 0) >= feedback,
    )
    return dict(st.inserted)


class BackgroundIngest:
    """The continuous consumer in a thread while the canary runs (the controller reads what it lands)."""

    def __init__(self, settings: Settings):
        from feedback.ingest import IngestConsumer

        self.consumer = IngestConsumer(settings)
        self.thread = threading.Thread(target=self.consumer.run, name="demo-ingest", daemon=True)

    def __enter__(self) -> BackgroundIngest:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.consumer.stop()  # run() returns after a final commit and closes everything itself
        self.thread.join(60)


def canary(settings: Settings, url: str, version: str, cfg: DemoConfig, run: Run) -> dict[str, Any]:
    """Start the release, drive held-out users through the API, let the controller decide on their ratings."""
    from pipelines import analysis
    from pipelines.config import ReleaseConfig
    from pipelines.release import Controller

    rcfg = ReleaseConfig(
        steps=(cfg.canary_share, 1.0),
        min_thumbs=cfg.min_thumbs,
        min_step_s=0,
        poll_s=5,
        max_step_s=cfg.eval_minutes * 60,
        on_timeout="hold",
    )
    ctl = Controller(settings, rcfg)
    st = ctl.start(version, "controller:demo", "gate passed; flywheel demo")
    run.say(
        f"canary: {version} serves {cfg.canary_share:.0%} of users (salt {st.salt[:8]}), production {st.production}"
    )
    sim_cfg = SimConfig(
        users=cfg.eval_users,
        minutes=cfg.eval_minutes,
        max_tokens=cfg.max_tokens,
        consent_rate=1.0,
        compare_rate=0.0,
        regenerate_rate=0.0,
        prompts="heldout",
        seed=cfg.seed + 1000,
        user_prefix="heldout",
    )
    box: dict[str, SimStats] = {}
    sim = threading.Thread(target=lambda: box.setdefault("stats", run_simulation(url, sim_cfg)), daemon=True)
    decided: dict[str, Any] = {}
    with BackgroundIngest(settings):
        sim.start()
        while sim.is_alive():
            st, a = ctl.tick()
            if a is not None:
                c, p = a.candidate.thumbs, a.production.thumbs
                run.say(
                    f"look: {st.candidate} {c.k}/{c.n} up vs {st.production} {p.k}/{p.n}: {a.decision} "
                    f"({'; '.join(a.reasons)[:140]})"
                )
            if st is not None and not st.active and not decided:
                decided = {"status": st.status, "reason": st.last.reason, "at_s": round(time.monotonic() - run.t0)}
                run.say(f"release decided: {st.status} ({st.last.reason[:160]})")
            sim.join(rcfg.poll_s)
        time.sleep(3)  # the last ratings reach Kafka and the warehouse
    st = ctl.log.current()
    if st.active:  # undecided when the held-out traffic ended: one final look decides or holds
        st, _ = ctl.tick()
    cand, prod = analysis.read_arms(settings.warehouse_path, version, st.production, st.started_at)
    final = analysis.analyse(cand, prod, rcfg, 0)
    return {
        "state": st,
        "sim": box.get("stats"),
        "candidate": cand,
        "production": prod,
        "analysis": final,
        "decided": decided,
    }


def _ci(r) -> list[float] | None:
    return [round(r.lo, 4), round(r.hi, 4)] if r.n else None


def run_demo(cfg: DemoConfig, home: Path, quiet: bool = False) -> dict[str, Any]:
    from pipelines import flows

    run = Run(quiet)
    settings = private_settings(home, get_settings())
    out: dict[str, Any] = {
        "home": str(home),
        "recipe": cfg.recipe,
        "config": cfg.__dict__ | {"overrides": list(cfg.overrides)},
    }
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from infra.prefect_server import api_url

    with Stack(settings, run) as stack, temporary_settings(updates={PREFECT_API_URL: api_url(settings)}):
        with run.stage("simulate"):
            sim = run_simulation(
                stack.url,
                SimConfig(
                    users=cfg.train_users,
                    minutes=cfg.train_minutes,
                    max_tokens=cfg.max_tokens,
                    consent_rate=0.95,
                    compare_rate=0.5,
                    regenerate_rate=0.5,
                    withdraw_rate=0.05,
                    prompts="train",
                    seed=cfg.seed,
                ),
            )
            out["simulate"] = {k: v for k, v in sim.as_dict().items() if k != "per_version"}
        with run.stage("ingest"):
            out["ingested"] = ingest_until(settings, sim.turns, sim.thumbs + sim.comparisons)
        with run.stage("curate"):
            from pipelines.config import CurateConfig

            snap = flows.curate(settings=settings, config=CurateConfig(eval_fraction=cfg.eval_fraction))
            from pipelines.snapshots import find_snapshot, load_manifest

            out["snapshot"] = {
                "snapshot_id": snap["snapshot_id"],
                "counts": snap["counts"],
                "yield": load_manifest(find_snapshot(settings.datasets_dir, snap["snapshot_id"])).get("yield"),
            }
            run.say(f"snapshot {snap['snapshot_id']}: {snap['counts']}")
        with run.stage("train"):
            trained = flows.train(
                snapshot_id=snap["snapshot_id"], recipe=cfg.recipe, overrides=list(cfg.overrides), settings=settings
            )
            out["train"] = {k: trained.get(k) for k in ("version", "gate", "eval", "seconds")}
            run.say(f"trained {trained.get('version')}: gate {trained.get('gate')}")
        gate = trained.get("gate") or {}
        if not gate.get("passed"):
            out["release_decision"] = f"not released: gate failed ({'; '.join(gate.get('reasons') or [])})"
        else:
            with run.stage("canary"):
                res = canary(settings, stack.url, trained["version"], cfg, run)
            st, cand, prod, a = res["state"], res["candidate"], res["production"], res["analysis"]
            out.update(
                {
                    "release_decision": st.status if not st.active else f"undecided ({st.status} {st.share:.0%})",
                    "release_reason": st.last.reason,
                    "thumbs_up_before": prod.thumbs.rate,
                    "thumbs_up_after": cand.thumbs.rate,
                    "thumbs_up_before_ci": _ci(prod.thumbs),
                    "thumbs_up_after_ci": _ci(cand.thumbs),
                    "n_before": prod.thumbs.n,
                    "n_after": cand.thumbs.n,
                    "p_value": a.p_value_fixed,
                    "p_value_sequential": a.p_value_sequential,
                    "diff_always_valid_ci": [a.diff_lo, a.diff_hi],
                    "production": prod.version,
                    "candidate": cand.version,
                    "decided": res["decided"],
                }
            )
    out["seconds"] = run.seconds
    out["cycle_s"] = round(time.monotonic() - run.t0, 1)
    return out


def demo(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (progress still goes to stderr)."),
    train_users: int = typer.Option(12, min=1, max=64, help="Simulated users whose ratings train the model."),
    train_minutes: float = typer.Option(8.0, min=0.1, help="How long they chat."),
    eval_users: int = typer.Option(8, min=1, max=64, help="Held-out simulated users during the canary."),
    eval_minutes: float = typer.Option(5.0, min=0.1, help="How long the canary traffic runs (at most)."),
    max_tokens: int = typer.Option(40, min=8, max=512, help="Answer length cap."),
    recipe: str = typer.Option("sft", help="Training recipe: sft, dpo, kto, rlhf."),
    overrides: list[str] | None = SET_OPTION,
    canary_share: float = typer.Option(0.5, min=0.01, max=1.0, help="Candidate's share of users at canary."),
    min_thumbs: int = typer.Option(20, min=5, help="Ratings per version before the controller may promote."),
    home: str = typer.Option("", help="Where the demo's world lives (default: a new temporary directory)."),
    seed: int = typer.Option(1, help="Who the simulated users are."),
) -> None:
    """simulate -> ingest -> curate -> train -> evaluate -> canary -> promote/rollback, measured, on this machine."""
    cfg = DemoConfig(
        train_users=train_users,
        train_minutes=train_minutes,
        eval_users=eval_users,
        eval_minutes=eval_minutes,
        max_tokens=max_tokens,
        recipe=recipe,
        overrides=tuple(overrides) if overrides else RECIPE_DEFAULTS.get(recipe, ()),
        canary_share=canary_share,
        min_thumbs=min_thumbs,
        seed=seed,
    )
    where = Path(home) if home else Path(tempfile.mkdtemp(prefix="flywheel-demo-"))
    where.mkdir(parents=True, exist_ok=True)
    base = get_settings().base_model_path
    if not (base / "config.json").exists():
        typer.echo(f"demo: the base model is missing at {base}: run `make setup`", err=True)
        raise typer.Exit(1)
    try:
        out = run_demo(cfg, where, quiet=False)
    except Exception as e:  # noqa: BLE001 - one sentence and where to look, not a stack trace
        msg = f"demo failed: {type(e).__name__}: {e} (its world, logs included, is in {where})"
        if as_json:
            print(json.dumps({"ok": False, "error": msg}))
        else:
            typer.echo(msg, err=True)
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(out, indent=2, default=str))
        return
    typer.echo(f"demo: {out['cycle_s']:.0f}s; stages {out['seconds']}")
    typer.echo(f"  recipe {out['recipe']}: {out.get('train', {}).get('version')} -> {out['release_decision']}")
    if "thumbs_up_before" in out:
        b, a = out["thumbs_up_before"], out["thumbs_up_after"]
        typer.echo(
            f"  held-out users' thumbs-up: before {b and f'{b:.1%}'} {out['thumbs_up_before_ci']} "
            f"(n={out['n_before']}), after {a and f'{a:.1%}'} {out['thumbs_up_after_ci']} (n={out['n_after']}),"
            f" p={out['p_value']}"
        )
