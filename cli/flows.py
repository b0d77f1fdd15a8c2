"""``flywheel run <flow>``: run one of the project's flows once, now, in this process.

When the Prefect server (``flywheel up``) is healthy the run is recorded there; otherwise Prefect's ephemeral
mode runs it. Curation progress is printed per stage.
"""

from __future__ import annotations

import json
import logging

import typer
from rich.console import Console

console = Console()
FLOW_NAMES = ("curate", "volume-trigger", "ingest-health", "train")


def run_flow(
    name: str = typer.Argument(..., help=f"One of: {', '.join(FLOW_NAMES)}."),
    snapshot: str = typer.Option("", help="train: the snapshot id (default: the newest)."),
    n: int = typer.Option(0, help="volume-trigger: ratings needed (default FLYWHEEL_CURATE_VOLUME_TRIGGER_N)."),
    as_json: bool = typer.Option(False, "--json", help="Print the flow's result as JSON."),
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
    if prefect_server.healthy(settings, timeout_s=1.0):
        for k, v in prefect_server.prefect_env(settings).items():
            if k.startswith("PREFECT_") and k != "PREFECT_HOME":
                os.environ.setdefault(k, v)
    if not as_json:
        from rich.logging import RichHandler

        logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console)])
    from pipelines import flows

    try:
        if name == "curate":
            result = flows.curate(settings=settings)
        elif name == "volume-trigger":
            result = flows.volume_trigger(n=n or None, settings=settings)
        elif name == "ingest-health":
            result = flows.ingest_health(settings=settings)
        else:
            from pipelines.snapshots import list_snapshots

            sid = snapshot or (list_snapshots(settings.datasets_dir) or [{}])[-1].get("snapshot_id")
            if not sid:
                console.print("[red]no snapshot to train on: run `flywheel run curate` first[/red]")
                raise typer.Exit(1)
            flows.train(sid, settings=settings)
            result = {"snapshot_id": sid, "trained": False, "note": "no training recipe installed"}
    except Exception as e:  # noqa: BLE001 - a failed flow is a failed command, loudly
        if as_json:
            print(json.dumps({"flow": name, "ok": False, "error": str(e)}))
        else:
            console.print(f"[red]{name} failed:[/red] {e}")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps({"flow": name, "ok": True, "result": result}, default=str, indent=2))
    else:
        console.print(f"[green]{name} ok[/green] {json.dumps(result, default=str)}")
