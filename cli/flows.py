"""``flywheel run <flow>``: run one of the project's flows once, now, in this process.

When the Prefect server (``flywheel up``) is healthy the run is recorded there; otherwise Prefect's ephemeral
mode runs it. Curation progress is printed per stage. Missing prerequisites (no warehouse yet, broker down, no
snapshot) are reported before Prefect starts, with the command that fixes them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import typer
from rich.console import Console

console = Console()
FLOW_NAMES = ("curate", "volume-trigger", "ingest-health", "train")


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
    problem = _precheck(name, settings, snapshot)
    if problem:
        _fail(name, problem, as_json)
    if prefect_server.healthy(settings, timeout_s=1.0):
        for k, v in prefect_server.prefect_env(settings).items():
            if k.startswith("PREFECT_") and k != "PREFECT_HOME":
                os.environ.setdefault(k, v)
    if not as_json:
        from rich.logging import RichHandler

        logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console)])
    for noisy in ("httpx", "httpcore", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pipelines import flows

    try:
        if name == "curate":
            result = flows.curate(settings=settings)
        elif name == "volume-trigger":
            result = flows.volume_trigger(n=n or None, settings=settings)
        elif name == "ingest-health":
            result = flows.ingest_health(settings=settings)
        else:
            from pipelines.snapshots import newest_usable

            sid = snapshot or newest_usable(settings.datasets_dir)["snapshot_id"]
            flows.train(sid, settings=settings)
            result = {"snapshot_id": sid, "trained": False, "note": "no training recipe installed"}
    except Exception as e:  # noqa: BLE001 - a failed flow is a failed command, loudly
        _fail(name, str(e), as_json)
    if as_json:
        print(json.dumps({"flow": name, "ok": True, "result": result}, default=str, indent=2))
    else:
        console.print(f"[green]{name} ok[/green] {json.dumps(result, default=str)}")
