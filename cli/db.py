"""``flywheel db``: a local PostgreSQL for the app's shared state (``infra/postgres.py``, issue 20).

    flywheel db start [--json]    # initialise once, start on 127.0.0.1:$FLYWHEEL_DB_PORT (5433), migrate; the URL
    flywheel db status [--json]   # running or not, where its files are, the schema version (exit 1 when down)
    flywheel db stop [--json]

Set the printed URL as ``FLYWHEEL_APP_DATABASE_URL`` for every app replica; without it the app keeps its state in
SQLite files under ``$FLYWHEEL_HOME/app/``.
"""

from __future__ import annotations

import json

import typer
from rich.console import Console

from feedback.settings import get_settings

JSON = typer.Option(False, "--json", help="Print one JSON object.")
db_app = typer.Typer(help="A local PostgreSQL for the app's shared state: start, status, stop.", no_args_is_help=True)
console = Console()


def _fail(message: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": message}))
    else:
        console.print(f"[red]db: {message}[/red]")
    raise typer.Exit(1)


@db_app.command("start")
def start(as_json: bool = JSON) -> None:
    """Initialise (once) and start the local PostgreSQL, create the database and apply the app's migrations."""
    from app.database import SchemaTooNew, migrate, schema_version
    from infra import postgres

    try:
        inst = postgres.start(get_settings())
        applied = migrate(inst.url)
    except (postgres.PostgresError, SchemaTooNew) as e:
        _fail(str(e), as_json)
    out = inst.as_dict() | {"migrations_applied": applied, "schema_version": schema_version(inst.url)}
    if as_json:
        print(json.dumps(out | {"url": inst.url}))
        return
    console.print(
        f"db: PostgreSQL answering on 127.0.0.1:{inst.port} (pid {inst.pid}), files in {inst.base}; schema version "
        f"{out['schema_version']}{f' (applied {applied})' if applied else ''}. For every app replica:"
    )
    print(f"export FLYWHEEL_APP_DATABASE_URL='{inst.url}'")


@db_app.command("status")
def status(as_json: bool = JSON) -> None:
    """Whether this home's PostgreSQL runs, where its files are, and its schema version."""
    from app.database import schema_version
    from infra import postgres

    inst = postgres.status(get_settings())
    out = inst.as_dict() if inst else {"running": False, "started_ever": False}
    if inst and inst.running:
        out["schema_version"] = schema_version(inst.url)
    if as_json:
        print(json.dumps(out))
    elif inst is None:
        console.print("db: no local PostgreSQL in this home yet: `flywheel db start`")
    else:
        state = "[green]running[/green]" if inst.running else "[red]stopped[/red]"
        console.print(f"db: {state} on 127.0.0.1:{inst.port}, files in {inst.base}")
    raise typer.Exit(0 if inst and inst.running else 1)


@db_app.command("stop")
def stop(as_json: bool = JSON) -> None:
    """Stop this home's PostgreSQL (its files stay: the next start finds everything)."""
    from infra import postgres

    try:
        stopped = postgres.stop(get_settings())
    except postgres.PostgresError as e:
        _fail(str(e), as_json)
    if as_json:
        print(json.dumps({"stopped": stopped}))
    else:
        console.print("db: stopped" if stopped else "db: no local PostgreSQL was running")
