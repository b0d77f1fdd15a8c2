"""``flywheel keys``: API keys for the ``/v1`` API (see ``app.keys``).

    flywheel keys create [--name ci-bot] [--json]   # prints the new key once; only its hash is kept
    flywheel keys list [--json]                      # key ids, names, when created / revoked
    flywheel keys revoke KEY_ID [--json]             # refused from the next request on

Creating the first key switches an app in ``api_auth=auto`` mode to requiring keys on its next request.
"""

from __future__ import annotations

import json
import time

import typer
from rich.console import Console
from rich.table import Table

from app.keys import ApiKey, KeyStore
from feedback.settings import get_settings

JSON = typer.Option(False, "--json", help="Print one JSON object.")

keys_app = typer.Typer(help="API keys for the /v1 API: create, list, revoke.", no_args_is_help=True)
console = Console()


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


@keys_app.command("create")
def create(
    name: str = typer.Option("", "--name", help="A label for whoever uses the key (shown by list)."),
    as_json: bool = JSON,
) -> None:
    """Create a key and print it once: store it now, it cannot be shown again."""
    store = KeyStore(get_settings())
    try:
        key, plaintext = store.create(name)
    finally:
        store.close()
    if as_json:
        print(json.dumps({"key": plaintext, **key.as_dict()}))
        return
    console.print(f"key {key.key_id} created{f' ({key.name})' if key.name else ''}. It is shown only now:")
    print(plaintext)
    console.print("Clients send it as 'Authorization: Bearer <key>' (the openai client's api_key).")


@keys_app.command("list")
def list_keys(as_json: bool = JSON) -> None:
    """Every key ever created (ids and names; the keys themselves are not stored)."""
    store = KeyStore(get_settings())
    try:
        keys: list[ApiKey] = store.list()
    finally:
        store.close()
    if as_json:
        print(json.dumps({"keys": [k.as_dict() for k in keys]}))
        return
    if not keys:
        console.print("no API keys yet: the API is keyless on loopback (create one: flywheel keys create)")
        return
    t = Table("key id", "name", "created", "revoked")
    for k in keys:
        t.add_row(k.key_id, k.name or "-", _when(k.created_at), _when(k.revoked_at))
    console.print(t)


@keys_app.command("revoke")
def revoke(
    key_id: str = typer.Argument(..., help="The key id, as `flywheel keys list` shows it."), as_json: bool = JSON
) -> None:
    """Revoke a key: requests that present it are refused from the next one on."""
    store = KeyStore(get_settings())
    try:
        key = store.revoke(key_id.strip())
    except KeyError:
        msg = f"no key {key_id!r}: see `flywheel keys list` for the ids"
        if as_json:
            print(json.dumps({"error": msg}))
        else:
            console.print(f"[red]keys: {msg}[/red]")
        raise typer.Exit(1) from None
    finally:
        store.close()
    if as_json:
        print(json.dumps(key.as_dict()))
    else:
        console.print(f"key {key.key_id} revoked at {_when(key.revoked_at)}")
