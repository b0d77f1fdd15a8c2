"""``flywheel roles``: AI trainers, reviewers, red-teamers and operators (see ``app.annotation.roles``).

    flywheel roles grant ana trainer --token $TOKEN    # prints ana's sign-in token for /train once (first grant)
    flywheel roles revoke ana trainer --token $TOKEN
    flywheel roles rotate ana --token $TOKEN           # a new sign-in token; the old one stops working
    flywheel roles topics ana fact,arithmetic --token $TOKEN  # what ana knows best: routed to her first
    flywheel roles list [--json]
    flywheel roles report [--json]                     # queue depth, throughput, agreement, per-annotator trust

Granting is an operator action: the admin token (``--token`` or ``FLYWHEEL_OPERATOR_TOKEN``), as for releases.
"""

from __future__ import annotations

import json

import typer
from rich.console import Console

from app.annotation.roles import ROLES, RoleError, RoleStore
from cli.releases import TOKEN, _fail, _operator
from feedback.settings import get_settings

JSON = typer.Option(False, "--json", help="Print one JSON object.")
roles_app = typer.Typer(help="Annotator roles: grant, revoke, rotate, topics, list, report.", no_args_is_help=True)
console = Console()


def _store() -> RoleStore:
    return RoleStore(get_settings())


@roles_app.command("grant")
def grant(
    name: str,
    role: str = typer.Argument(..., help=f"One of {', '.join(ROLES)}."),
    token: str = TOKEN,
    as_json: bool = JSON,
) -> None:
    """Give NAME a role; the first grant prints their sign-in token for /train (shown once)."""
    actor = _operator(token, as_json)
    store = _store()
    try:
        new = store.grant(name, role, by=actor)
    except RoleError as e:
        _fail(str(e), as_json)
    finally:
        store.close()
    if as_json:
        print(json.dumps({"name": name, "role": role, "token": new}))
        return
    console.print(f"{name} is now a {role}.")
    if new:
        console.print("Their sign-in token for /train, shown only now:")
        print(new)


@roles_app.command("revoke")
def revoke(name: str, role: str, token: str = TOKEN, as_json: bool = JSON) -> None:
    """Take a role away (their next request is refused when no role is left)."""
    _operator(token, as_json)
    store = _store()
    try:
        done = store.revoke(name, role)
    finally:
        store.close()
    if as_json:
        print(json.dumps({"name": name, "role": role, "revoked": done}))
    else:
        console.print(f"{name}: {role} revoked" if done else f"{name} did not have the role {role}")


@roles_app.command("rotate")
def rotate(name: str, token: str = TOKEN, as_json: bool = JSON) -> None:
    """A new sign-in token for NAME (the old one stops working at once)."""
    _operator(token, as_json)
    store = _store()
    try:
        new = store.rotate(name)
    except RoleError as e:
        _fail(str(e), as_json)
    finally:
        store.close()
    print(json.dumps({"name": name, "token": new}) if as_json else new)


@roles_app.command("topics")
def topics(
    name: str,
    topics: str = typer.Argument("", help="Comma-separated, e.g. fact,arithmetic,harmful,report:wrong; empty clears."),
    token: str = TOKEN,
    as_json: bool = JSON,
) -> None:
    """What NAME knows best: the trainers' queue hands them tasks on these topics before the rest."""
    _operator(token, as_json)
    store = _store()
    try:
        kept = store.set_topics(name, topics.split(","))
    except RoleError as e:
        _fail(str(e), as_json)
    finally:
        store.close()
    if as_json:
        print(json.dumps({"name": name, "topics": list(kept)}))
    else:
        console.print(f"{name}: {', '.join(kept) or 'no topics (every task in priority order)'}")


@roles_app.command("list")
def list_roles(as_json: bool = JSON) -> None:
    """Every annotator and their roles (tokens are never shown again)."""
    store = _store()
    try:
        people = store.list()
    finally:
        store.close()
    if as_json:
        rows = [{"name": a.name, "roles": list(a.roles), "topics": list(a.topics)} for a in people]
        print(json.dumps({"annotators": rows}))
        return
    for a in people:
        topics_note = f"  topics: {', '.join(a.topics)}" if a.topics else ""
        console.print(f"{a.name:20} {', '.join(a.roles) or '(no role)'}{topics_note}")
    if not people:
        console.print("no annotators yet: `flywheel roles grant <name> trainer --token ...`")


@roles_app.command("report")
def report(as_json: bool = JSON) -> None:
    """Queue depth, the last hour's submissions, agreement (Krippendorff's alpha) and each annotator's trust."""
    from app.annotation.queue import TaskQueue
    from pipelines.annotation_report import annotation_report

    s = get_settings()
    queue = TaskQueue(s)
    try:
        out = annotation_report(s, queue.gold(), queue.depth(), queue.throughput(3600))
    finally:
        queue.close()
    if as_json:
        print(json.dumps(out, default=str))
        return
    console.print(f"queue: {out['queue_depth']}  submitted in the last hour: {sum(out['throughput_1h'].values())}")
    console.print(
        "agreement (alpha): " + ", ".join(f"{k[6:]} {v}" for k, v in out["agreement"].items() if k.startswith("alpha_"))
    )
    for t in out["annotators"]:
        console.print(
            f"  {t['annotator']:20} gold {t['gold_right']}/{t['gold_tasks']}  trust {t['trust']:.2f}  "
            f"judgments {t['judgments']}"
        )


@roles_app.command("export")
def export(
    fmt: str = typer.Argument(..., help="label-studio (every annotator's judgments) or hh-rlhf (red-team findings)."),
    out: str = typer.Argument(..., help="The JSON file to write."),
    as_json: bool = JSON,
) -> None:
    """Every annotator's raw judgments as Label Studio tasks, or red-team findings as hh-rlhf rows."""
    from pathlib import Path

    from feedback.warehouse import connect
    from pipelines.exports import to_hh_redteam, to_label_studio

    s = get_settings()
    table = {"label-studio": "judgments", "hh-rlhf": "redteam_findings"}.get(fmt)
    if table is None:
        _fail("the format is label-studio or hh-rlhf", as_json)
    if not s.warehouse_path.exists():
        _fail(f"no warehouse at {s.warehouse_path}: nothing was ingested yet", as_json)
    with connect(s.warehouse_path, read_only=True) as con:
        cur = con.execute(f"SELECT * FROM {table} ORDER BY ts, event_id")
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    data = to_label_studio(rows) if fmt == "label-studio" else to_hh_redteam(rows)
    Path(out).write_text(json.dumps(data, indent=1, default=str))
    summary = {"format": fmt, "rows_in": len(rows), "items_out": len(data), "file": out}
    print(json.dumps(summary) if as_json else f"{fmt}: {len(rows)} rows -> {len(data)} items in {out}")


@roles_app.command("import-label-studio")
def import_label_studio(path: str, token: str = TOKEN, as_json: bool = JSON) -> None:
    """Judgments made in Label Studio (Flywheel's label config) into the loop, as events; all or nothing."""
    from pathlib import Path

    from feedback.producer import EventProducer
    from pipelines.exports import from_label_studio

    _operator(token, as_json)
    try:
        tasks = json.loads(Path(path).read_text())
        if not isinstance(tasks, list):
            raise ValueError("the file must hold a JSON list of Label Studio tasks")
        judgments = from_label_studio(tasks)  # every task checked before anything is sent
    except (OSError, ValueError) as e:
        _fail(f"nothing imported: {e}", as_json)
    producer = EventProducer(get_settings(), spool_name="label-studio-import")
    try:
        for j in judgments:
            producer.emit(j)
        sent = producer.flush(60)
    finally:
        producer.close()
    out = {"tasks": len(tasks), "judgments": len(judgments), "delivered": sent}
    print(json.dumps(out) if as_json else f"imported {len(judgments)} judgments from {len(tasks)} tasks"
          + ("" if sent else " (spooled: they reach Kafka when the broker answers)"))  # fmt: skip
