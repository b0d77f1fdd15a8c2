"""``flywheel deletions list|process``: deletion requests that are not complete in every store, and finishing them.

Training refuses to start while any is pending (``feedback.deletion.pending_deletions``); the app finishes them
within seconds on its own, this is for when it is not running (or the warehouse stayed busy).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import typer
from rich.console import Console
from rich.table import Table

from feedback.settings import get_settings

deletions_app = typer.Typer(help="Deletion requests: what is pending, and finishing them.", no_args_is_help=True)
console = Console()
JSON = typer.Option(False, "--json", help="Print one JSON object instead of a table.")


def _show(pending: list, as_json: bool, done_msg: str) -> None:
    if as_json:
        print(json.dumps({"pending": [p.as_dict() for p in pending]}, indent=2))
        return
    if not pending:
        console.print(done_msg)
        return
    t = Table("request", "requested", "steps left", "last error")
    for p in pending:
        when = datetime.fromtimestamp(p.requested_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        t.add_row(p.request_id[:12], when, ", ".join(p.steps_left), p.last_error or "")
    console.print(t)
    console.print("finish them with `flywheel deletions process` (the warehouse must not be held by a long query)")


@deletions_app.command("list")
def list_pending(as_json: bool = JSON) -> None:
    """Deletion requests not yet complete in every store (exit 1 when any is pending)."""
    from feedback.deletion import pending_deletions

    pending = pending_deletions(get_settings())
    _show(pending, as_json, "no deletion is pending")
    raise typer.Exit(1 if pending else 0)


@deletions_app.command("process")
def process(as_json: bool = JSON) -> None:
    """Run every pending deletion's remaining steps now (keys, warehouse, snapshots, compaction)."""
    from feedback.deletion import process_deletions

    left = process_deletions(get_settings())
    _show(left, as_json, "every deletion request is complete")
    raise typer.Exit(1 if left else 0)
