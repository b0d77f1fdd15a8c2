"""``flywheel``: one command for operators. Every command prints a readable summary; ``--json`` prints one
JSON object instead.

    flywheel up                     # the whole stack in the foreground; Ctrl-C stops it cleanly
    flywheel status [--json]        # broker health, per-topic lag, warehouse row counts
    flywheel kafka start [--brokers 3]|stop|status
    flywheel db start|stop|status   # a local PostgreSQL for the app's shared state (FLYWHEEL_APP_DATABASE_URL)
    flywheel down                   # stop what a (killed) `flywheel up` left running, the broker included
    flywheel ingest                 # the continuous Kafka -> DuckDB consumer
    flywheel simulate               # simulated users chat and rate through the API
"""

from __future__ import annotations

import json
import logging
import os
import sys

# Every process of the stack (app, ingest, Prefect worker, training runs) inherits this before torch loads libgomp:
# OpenMP threads that spin while they wait starve the other processes on a small machine. Three processes training
# at once on 2 cores took 46 s a step each with spinning threads and 18 s with passive ones (one alone: 6.4 vs 7.3 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer
from rich.console import Console
from rich.table import Table

from feedback.settings import get_settings

app = typer.Typer(
    help="Flywheel: a chat product whose users make its model better.", no_args_is_help=True, add_completion=False
)
kafka_app = typer.Typer(help="The local Apache Kafka broker (KRaft, one node).", no_args_is_help=True)
app.add_typer(kafka_app, name="kafka")
console = Console()
JSON = typer.Option(False, "--json", help="Print one JSON object instead of a table.")


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


@kafka_app.command("start")
def kafka_start(
    brokers: int = typer.Option(
        0,
        "--brokers",
        min=0,
        max=5,
        help="Local brokers (3: a cluster with RF 3, min.insync.replicas=2); default FLYWHEEL_KAFKA_LOCAL_BROKERS (1).",
    ),
    as_json: bool = JSON,
) -> None:
    """Start the broker(s) (fetching jars on first use) and wait until they answer; harmless if running."""
    from infra import kafka_local

    s = get_settings()
    n = brokers or s.kafka_local_brokers
    try:
        st = kafka_local.start(s, quiet=as_json) if n == 1 else kafka_local.start_cluster(s, n, quiet=as_json)
    except kafka_local.KafkaError as e:
        console.print(f"[red]kafka: {e}[/red]")
        raise typer.Exit(1) from None
    if as_json:
        _print_json(st.as_dict())
    elif n == 1:
        console.print(
            f"kafka: broker answering on {st.bootstrap} (pid {st.pid or 'external'}); "
            f"topics {', '.join(s.topics.values())}"
        )
    else:
        console.print(
            f"kafka: {n} brokers answering on {st.bootstrap} (replication 3, min.insync.replicas 2). "
            f"Point the stack at all of them: FLYWHEEL_KAFKA_LOCAL_BROKERS={n} flywheel up "
            f"(or FLYWHEEL_KAFKA_BOOTSTRAP={st.bootstrap} FLYWHEEL_KAFKA_REPLICATION=3 "
            "FLYWHEEL_KAFKA_MIN_INSYNC=2)"
        )


@kafka_app.command("stop")
def kafka_stop(as_json: bool = JSON) -> None:
    """Stop the local broker(s) cleanly (their data stays)."""
    from infra import kafka_local

    stopped = kafka_local.stop_all(get_settings())
    if as_json:
        _print_json({"stopped": stopped})
    else:
        console.print(f"kafka: stopped {', '.join(stopped)}" if stopped else "kafka: no local broker was running")


@kafka_app.command("status")
def kafka_status(as_json: bool = JSON) -> None:
    """Is the local broker (or cluster) running and answering?"""
    from infra import kafka_local

    s = get_settings()
    st = kafka_local.cluster_status(s) if s.kafka_local_brokers > 1 else kafka_local.status(s)
    if as_json:
        _print_json(st.as_dict())
    else:
        state = "[green]answering[/green]" if st.answering else "[red]not answering[/red]"
        console.print(f"kafka: {st.bootstrap} {state}; pid {st.pid or '-'}; data {st.data_dir}")
    raise typer.Exit(0 if st.answering else 1)


def collect_status() -> dict:
    from feedback.ingest import lag
    from feedback.warehouse import WarehouseBusy, row_counts
    from infra import kafka_local

    s = get_settings()
    out: dict = {"flywheel_home": str(s.home.resolve()), "kafka": {"bootstrap": s.kafka_bootstrap}}
    up = kafka_local.answering(s)
    out["kafka"]["healthy"] = up
    if up:
        try:
            out["topics"] = lag(s)
        except Exception as e:  # noqa: BLE001 - report, don't crash the status command
            out["topics_error"] = str(e)
    try:
        out["warehouse"] = {
            "path": str(s.warehouse_path),
            "exists": s.warehouse_path.exists(),
            "rows": row_counts(s.warehouse_path),
        }
    except WarehouseBusy as e:
        out["warehouse"] = {"path": str(s.warehouse_path), "error": str(e)}
    return out


@app.command()
def status(as_json: bool = JSON) -> None:
    """Broker health, per-topic messages and ingest lag, warehouse row counts (exit 1 if the broker is down)."""
    st = collect_status()
    if as_json:
        _print_json(st)
        raise typer.Exit(0 if st["kafka"]["healthy"] else 1)
    k = st["kafka"]
    console.print(
        f"[bold]Kafka[/bold] {k['bootstrap']}: "
        + ("[green]healthy[/green]" if k["healthy"] else "[red]down[/red] (start it: flywheel kafka start)")
    )
    if "topics" in st:
        t = Table("topic", "partitions", "messages", "ingest lag")
        for name, v in st["topics"].items():
            t.add_row(name, str(v["partitions"]), str(v["messages"]), "-" if v["lag"] is None else str(v["lag"]))
        console.print(t)
    w = st["warehouse"]
    if "rows" in w:
        console.print(f"[bold]Warehouse[/bold] {w['path']}")
        t = Table("table", "rows")
        for name, n in w["rows"].items():
            t.add_row(name, str(n))
        console.print(t)
    else:
        console.print(f"[yellow]warehouse: {w['error']}[/yellow]")
    if not w.get("exists", True):
        console.print("(no warehouse yet: `flywheel ingest`, started by `make run`, creates it)")
    raise typer.Exit(0 if k["healthy"] else 1)


@app.command()
def ingest() -> None:
    """Run the continuous Kafka -> DuckDB consumer in the foreground (Ctrl-C stops it after a final commit)."""
    from feedback import ingest as ingest_mod

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    ingest_mod.main()


@app.command()
def up(
    app_server: bool = typer.Option(True, "--app/--no-app", help="Start the chat app and API."),
    prefect: bool = typer.Option(True, "--prefect/--no-prefect", help="Start the Prefect server and flows."),
    vllm: bool = typer.Option(False, "--vllm", help="GPU: start vLLM's OpenAI server for the base version."),
) -> None:
    """Start the whole stack in the foreground: broker, ingest, app, Prefect. Ctrl-C stops everything."""
    from cli.stack import exit_now, run_stack

    exit_now(run_stack(get_settings(), app_server=app_server, prefect=prefect, vllm=vllm))


@app.command()
def down(as_json: bool = JSON) -> None:
    """Stop what `flywheel up` started, even if it was killed: supervisor, app, ingest, flows, Prefect, broker(s)."""
    from cli.stack import down as stack_down

    out = stack_down(get_settings())
    if as_json:
        _print_json(out)
        return
    seconds = out.pop("seconds")
    if out:
        for name, how in out.items():
            console.print(f"{how} {name}")
        console.print(f"flywheel down: done in {seconds}s")
    else:
        console.print("flywheel down: nothing was running")


def _mount_parts() -> None:
    """The commands of the product and the pipelines (imported here, so `flywheel kafka ...` stays light)."""
    from cli.app_cmd import app_cmd
    from cli.datasets import datasets_app
    from cli.db import db_app
    from cli.deletions import deletions_app
    from cli.demo_cmd import demo
    from cli.flows import run_flow
    from cli.keys import keys_app
    from cli.models import models_app
    from cli.releases import releases_app
    from cli.roles import roles_app
    from cli.simulate import simulate

    app.add_typer(datasets_app, name="datasets")
    app.add_typer(db_app, name="db")
    app.add_typer(deletions_app, name="deletions")
    app.add_typer(app_cmd, name="app")
    app.add_typer(keys_app, name="keys")
    app.add_typer(models_app, name="models")
    app.add_typer(releases_app, name="releases")
    app.add_typer(roles_app, name="roles")
    app.command("simulate")(simulate)
    app.command("demo")(demo)
    app.command("run", help="Run a flow once, now: flywheel run <flow>.")(run_flow)


def main() -> None:
    _mount_parts()
    app()


if __name__ == "__main__":
    sys.exit(main())
