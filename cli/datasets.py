"""``flywheel datasets list|show <id>|purge-deleted``: dataset snapshots, their manifests, and retiring those that
hold data of users who asked for deletion."""

from __future__ import annotations

import json

import typer
from rich import box
from rich.console import Console
from rich.table import Column, Table

from feedback.settings import get_settings

datasets_app = typer.Typer(help="Dataset snapshots curated from the warehouse.", no_args_is_help=True)
console = Console()
JSON = typer.Option(False, "--json", help="Print JSON.")


def _status(m: dict) -> str:
    r = m.get("retired")
    if not r:
        return "ok"
    return "erased" if r.get("files_purged") else "retired"


@datasets_app.command("list")
def list_cmd(as_json: bool = JSON) -> None:
    """Every snapshot, oldest first, with its row counts; retired ones are never used for training."""
    from pipelines.snapshots import list_snapshots

    snaps = list_snapshots(get_settings().datasets_dir)
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "snapshot_id": m["snapshot_id"],
                        "created_at": m["created_at"],
                        "path": m["path"],
                        "status": _status(m),
                        "retired": m["retired"],
                        "counts": m["counts"],
                    }
                    for m in snaps
                ],
                indent=2,
            )
        )
        return
    if not snaps:
        console.print(f"no snapshots in {get_settings().datasets_dir}: run `flywheel run curate`")
        return
    t = Table(
        Column("snapshot", no_wrap=True, min_width=16),
        Column("created UTC", no_wrap=True),
        *(Column(h, no_wrap=True) for h in ("status", "sft", "kto", "pairs", "prompts")),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for m in snaps:
        c = m["counts"]

        def tv(name: str, c: dict = c) -> str:
            return f"{c[name].get('train', 0)}/{c[name].get('eval', 0)}"

        status = _status(m)
        t.add_row(
            m["snapshot_id"],
            m["created_at"][5:16].replace("T", " "),
            status if status == "ok" else f"[red]{status}[/red]",
            tv("sft"),
            tv("kto"),
            tv("pairs"),
            f"{c['prompts']['train']}/{c['eval_prompts']['eval']}",
        )
    console.print(t)
    console.print(
        "train/eval rows; retired/erased: holds data of users who asked for deletion, never trained on; "
        "`flywheel datasets show <id>` for the manifest"
    )


@datasets_app.command("show")
def show_cmd(
    snapshot_id: str = typer.Argument(..., help="Snapshot id or a unique prefix."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """One snapshot's manifest: files, filter counts, source offsets, config, retirement."""
    from pipelines.snapshots import find_snapshot, load_manifest, retired

    try:
        path = find_snapshot(get_settings().datasets_dir, snapshot_id)
    except KeyError as e:
        msg = f"{e.args[0]}: see `flywheel datasets list` (or create one: `flywheel run curate`)"
        if as_json:
            print(json.dumps({"ok": False, "error": msg}))
        else:
            console.print(f"[red]{msg}[/red]")
        raise typer.Exit(1) from None
    m = load_manifest(path)
    m["retired"] = retired(path)
    if as_json:
        print(json.dumps(m, indent=2))
        return
    console.print(f"[bold]{m['snapshot_id']}[/bold]  created {m['created_at']}  {path}")
    if m["retired"]:
        r = m["retired"]
        erased = "; data files erased" if r.get("files_purged") else ""
        console.print(f"[red]RETIRED[/red] {r['retired_at'][:19]}: {r['reason']}{erased}")
    console.print(f"content sha256 {m['content_sha256']}  PII engine {m['pii']['engine']}")
    files = Table("file", "rows")
    for rel, f in m["files"].items():
        files.add_row(rel, str(f["rows"]))
    console.print(files)
    filt = Table("stage", "in", "out", "dropped / notes")
    for f in m["filters"]:
        filt.add_row(
            f["stage"],
            str(f["in"]),
            str(f["out"]),
            ", ".join(f"{k}={v}" for k, v in f["dropped"].items() if v) or "-",
        )
    console.print(filt)
    y = m.get("yield")
    if y:
        lost = ", ".join(f"{k}={v}" for k, v in y["ratings_lost"].items()) or "none"
        console.print(
            f"yield: {y['ratings_in']} ratings in, {y['ratings_usable']} usable (lost: {lost}) -> training rows "
            f"{y['training_rows_out']} ({y['training_rows_per_rating_in']} per rating in)"
        )
    src = m["source"]
    for name in ("turns", "feedback", "user_actions"):
        d = src.get(name, {})
        console.print(
            f"source {name}: {d.get('rows', 0)} rows, ts {d.get('ts_min', '-')} .. {d.get('ts_max', '-')}, "
            f"kafka offsets {d.get('kafka_offsets', {})}"
        )


@datasets_app.command("purge-deleted")
def purge_deleted_cmd(
    keep_files: bool = typer.Option(False, "--keep-files", help="Only mark them retired; keep their data files."),
    as_json: bool = JSON,
) -> None:
    """Retire every snapshot holding data of a user who asked for deletion, and erase its data files."""
    from pipelines.snapshots import retire_deleted

    s = get_settings()
    if not s.warehouse_path.exists():
        msg = f"no warehouse at {s.warehouse_path}: nothing ingested yet, so no deletion requests (`make run` first)"
        if as_json:
            print(json.dumps({"ok": False, "error": msg}))
        else:
            console.print(f"[yellow]{msg}[/yellow]")
        raise typer.Exit(1)
    done = retire_deleted(
        s.warehouse_path, s.datasets_dir, purge_files=not keep_files, timeout_s=s.warehouse_lock_timeout_s
    )
    if as_json:
        print(json.dumps({"ok": True, "retired": done}, indent=2))
        return
    if not done:
        console.print("no snapshot holds data of users who asked for deletion")
    for d in done:
        erased = "data files erased" if d["files_purged"] else "files kept (--keep-files)"
        console.print(f"[red]retired[/red] {d['snapshot_id']}: {d['reason']}; {erased}")
