"""``flywheel run <flow>``: run one of the project's flows once, now.

When the Prefect server (``flywheel up``) is healthy the run is recorded there; otherwise Prefect's ephemeral
mode runs it. Curation progress is printed per stage. Missing prerequisites (no warehouse yet, broker down, no
snapshot) are reported before Prefect starts, with the command that fixes them.

``flywheel run train`` submits a run of the ``train`` deployment when the server is up and a worker serves its
pool (``flywheel up`` starts one; ``--deployment train-gpu`` targets the GPU pool), then follows it: the run's
log lines as they arrive, and the summary from its ``train-result`` artifact. Otherwise (or with ``--local``) it
runs the flow in this process. Either way it ends with the version, the gate verdict and its reasons, the win
rate and the seconds per stage; ``--json`` prints the flow's dict.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import typer
from rich.console import Console

console = Console()
FLOW_NAMES = ("curate", "volume-trigger", "ingest-health", "train")
SET_OPTION = typer.Option(
    None, "--set", help="train: a key=value config override (repeatable), e.g. train.max_steps=2."
)


def _fail(name: str, error: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"flow": name, "ok": False, "error": error}))
    else:
        console.print(f"[red]{name} failed:[/red] {error}")
    raise typer.Exit(1)


def _precheck(name: str, settings: Any, snapshot: str) -> str | None:
    """Why ``name`` cannot run now, and what to do about it; None when it can."""
    if name in ("curate", "volume-trigger") and not settings.warehouse_path.exists():
        return (
            f"no warehouse at {settings.warehouse_path} yet: nothing has been ingested. Start the stack with "
            "`make run` (or `flywheel kafka start` and `flywheel ingest`), chat and rate a few answers, then retry"
        )
    if name == "ingest-health":
        from infra import kafka_local

        if not kafka_local.answering(settings):
            return (
                f"Kafka at {settings.kafka_bootstrap} is not answering: start it with `flywheel kafka start` "
                "(or `make run`), then retry"
            )
    if name == "train":
        from pipelines.snapshots import find_snapshot, newest_usable, retired

        if not snapshot:
            return (
                None
                if newest_usable(settings.datasets_dir)
                else (f"no usable dataset snapshot in {settings.datasets_dir}: run `flywheel run curate` first")
            )
        try:
            path = find_snapshot(settings.datasets_dir, snapshot)
        except KeyError as e:
            return f"{e.args[0]}: see `flywheel datasets list`"
        if mark := retired(path):
            return f"snapshot {path.name} is retired ({mark['reason']}): run `flywheel run curate` for a fresh one"
    return None


def run_flow(
    name: str = typer.Argument(..., help=f"One of: {', '.join(FLOW_NAMES)}."),
    snapshot: str = typer.Option("", help="train: the snapshot id (default: the newest that is not retired)."),
    n: int = typer.Option(0, help="volume-trigger: ratings needed (default FLYWHEEL_CURATE_VOLUME_TRIGGER_N)."),
    recipe: str = typer.Option(
        "", help="train: pretrain, sft, reward, rlhf, dpo, kto (default FLYWHEEL_TRAIN_RECIPE)."
    ),
    parent: str = typer.Option("", help="train: version to start from (default FLYWHEEL_TRAIN_PARENT: production)."),
    config: str = typer.Option("", help="train: tiny, gpu or a YAML path (default FLYWHEEL_TRAIN_CONFIG)."),
    override: list[str] | None = SET_OPTION,
    deployment: str = typer.Option("train", help="train: the deployment to submit to (train, or train-gpu)."),
    local: bool = typer.Option(False, "--local", help="train: run in this process even if a worker is up."),
    as_json: bool = typer.Option(False, "--json", help="Print the flow's result as JSON (logs go to stderr)."),
) -> None:
    """Run a flow once, now."""
    import os

    from feedback.settings import get_settings
    from infra import prefect_server

    settings = get_settings()
    name = name.replace("_", "-")
    if name not in FLOW_NAMES:
        console.print(f"[red]unknown flow {name!r}[/red]; choose from {', '.join(FLOW_NAMES)}")
        raise typer.Exit(2)
    args = TrainArgs(snapshot or None, recipe or None, parent or None, config or None, list(override or []) or None)
    problem = (_train_precheck(args) if name == "train" else None) or _precheck(name, settings, snapshot)
    if problem:
        _fail(name, problem, as_json)
    server_up = prefect_server.healthy(settings, timeout_s=1.0)
    if server_up:
        for k, v in prefect_server.prefect_env(settings).items():
            if k.startswith("PREFECT_") and k != "PREFECT_HOME":
                os.environ.setdefault(k, v)
    if not as_json:
        from rich.logging import RichHandler

        logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console)])
    for noisy in ("httpx", "httpcore", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if name == "train":
        result = _train(settings, args, deployment, server_up and not local, as_json)
        if as_json:
            print(json.dumps(result, default=str, indent=2))
        else:
            print_train_summary(result)
        raise typer.Exit(0 if result.get("gate", {}).get("passed") else 3)
    from pipelines import flows

    try:
        if name == "curate":
            result = flows.curate(settings=settings)
        elif name == "volume-trigger":
            result = flows.volume_trigger(n=n or None, settings=settings)
        else:
            result = flows.ingest_health(settings=settings)
    except Exception as e:  # noqa: BLE001 - a failed flow is a failed command, loudly
        _fail(name, str(e), as_json)
    if as_json:
        print(json.dumps({"flow": name, "ok": True, "result": result}, default=str, indent=2))
    else:
        console.print(f"[green]{name} ok[/green] {json.dumps(result, default=str)}")


# ---------------------------------------------------------------------------------------------------------
# flywheel run train
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainArgs:
    snapshot_id: str | None
    recipe: str | None
    parent: str | None
    config: str | None
    overrides: list[str] | None

    def parameters(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _train_precheck(args: TrainArgs) -> str | None:
    """A recipe or config typo (TRL keys included), found here in seconds rather than on a worker after a judge
    model was trained."""
    from pipelines.tasks import TrainRefused, check_trl_section, train_config
    from training.config import ConfigError
    from training.runner import resolve_config

    try:
        cfg = train_config(args.recipe, args.parent, args.config, args.overrides)
        _, recipe_cfg = resolve_config(cfg.recipe, cfg.config, list(cfg.overrides))
        check_trl_section(cfg.recipe, recipe_cfg)
    except (TrainRefused, ConfigError) as e:
        return str(e)
    return None


def _train(settings: Any, args: TrainArgs, deployment: str, remote: bool, as_json: bool) -> dict[str, Any]:
    """On the deployment's worker when one is online, else in this process; a failure exits with its sentence."""
    where = _online_deployment(settings, deployment) if remote else None
    if where is None and deployment != "train":
        _fail(
            "train",
            f'no worker is online for deployment train/{deployment}: start one (README "Training runs on work '
            'pools") or drop --deployment to train here',
            as_json,
        )
    try:
        if where is not None:
            return follow_deployment_run(where, args, as_json)
        from pipelines import flows

        return flows.train(**args.parameters(), settings=settings)
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - a failed flow (or run) is a failed command, in its own sentence
        _fail("train", str(e), as_json)
    raise AssertionError("unreachable")


class RemoteRunFailed(RuntimeError):
    """The submitted run ended without a result; the message is its final state's message."""


def _online_deployment(settings: Any, deployment: str) -> str | None:
    """``train/<deployment>`` when it exists and a worker of its pool is online; None otherwise."""
    from prefect import get_client
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus
    from prefect.exceptions import ObjectNotFound

    from pipelines.serve import TRAIN_FLOW

    full = f"{TRAIN_FLOW}/{deployment}"
    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(full)
        except ObjectNotFound:
            return None
        if not dep.work_pool_name:
            return None
        online = client.read_workers_for_work_pool(
            dep.work_pool_name, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
        )
    return full if online else None


def follow_deployment_run(deployment: str, args: TrainArgs, as_json: bool, poll_s: float = 2.0) -> dict[str, Any]:
    """Submit a run, print its log lines until it ends (to stderr with ``--json``), return its result."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.deployments import run_deployment

    out = Console(stderr=True) if as_json else console
    run = run_deployment(deployment, parameters=args.parameters(), timeout=0)
    out.print(f"submitted {run.name} ({run.id}) to {deployment}; following it (Ctrl-C stops following, not the run)")
    seen = 0
    with get_client(sync_client=True) as client:
        log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
        try:
            while True:
                state = client.read_flow_run(run.id).state
                logs = client.read_logs(log_filter=log_filter, sort=LogSort.TIMESTAMP_ASC, offset=seen, limit=200)
                for log in logs:
                    out.print(f"{log.timestamp:%H:%M:%S} {_one_line(log.message)}", highlight=False, markup=False)
                seen += len(logs)
                if state is not None and (state.is_final() or state.is_cancelling()) and not logs:
                    break  # cancelling: the worker stops it; its final state may never be written if it died
                if not logs:
                    time.sleep(poll_s)
        except KeyboardInterrupt:
            out.print(f"stopped following; the run goes on: `prefect flow-run logs {run.id}`")
            raise typer.Exit(130) from None
        if not state.is_completed():
            raise RemoteRunFailed(f"run {run.name} ended {state.name}: {state.message or 'see its log above'}")
        return _artifact_result(client, run.id)


def _one_line(message: str) -> str:
    """A log message without its traceback: the first line and, for an exception, its last line."""
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    if len(lines) > 1 and any(ln.startswith("Traceback") for ln in lines):
        return f"{lines[0]} {lines[-1].strip()}"
    return message.rstrip()


def _artifact_result(client: Any, flow_run_id: Any) -> dict[str, Any]:
    """The flow's dict, from the JSON block of the ``train-result`` artifact it published."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    arts = client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-result"])),
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
    )
    for art in arts:
        m = re.search(r"```json\n(.*)\n```", str(art.data), re.S)
        if m:
            return json.loads(m.group(1))
    raise RemoteRunFailed(f"run {flow_run_id} completed but published no train-result artifact")


def print_train_summary(result: dict[str, Any]) -> None:
    gate = result.get("gate", {})
    ev = result.get("eval", {})
    verdict = "[green]PASSED[/green]" if gate.get("passed") else "[red]FAILED[/red]"
    console.print(
        f"[bold]{result.get('version')}[/bold] ({result.get('recipe')} from {result.get('parent')}, snapshot "
        f"{result.get('snapshot_id')}): gate {verdict}"
    )
    for reason in gate.get("reasons", []):
        console.print(f"  - {reason}", markup=False)
    if ev.get("win_rate") is not None:
        lo, hi = ev.get("win_rate_ci95", [None, None])
        console.print(
            f"  win rate vs {ev.get('production')}: {ev['win_rate']:.2f} (95% CI {lo}-{hi}, n={ev.get('n')}, "
            f"judge {ev.get('judge')})"
        )
    stages = result.get("stages", {})
    console.print("  seconds: " + ", ".join(f"{k.removesuffix('_s')} {v}" for k, v in stages.items()))
    if result.get("reward_models_trained"):
        console.print(f"  reward models trained first: {', '.join(result['reward_models_trained'])}")
