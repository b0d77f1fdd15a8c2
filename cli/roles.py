"""``flywheel roles``: AI trainers, reviewers, red-teamers and operators (see ``app.annotation.roles``).

    flywheel roles grant ana trainer --token $TOKEN    # prints ana's sign-in token for /train once (first grant)
    flywheel roles revoke ana trainer --token $TOKEN
    flywheel roles rotate ana --token $TOKEN           # a new sign-in token; the old one stops working
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
roles_app = typer.Typer(help="Annotator roles: grant, revoke, rotate, list, report.", no_args_is_help=True)
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


@roles_app.command("list")
def list_roles(as_json: bool = JSON) -> None:
    """Every annotator and their roles (tokens are never shown again)."""
    store = _store()
    try:
        people = store.list()
    finally:
        store.close()
    if as_json:
        print(json.dumps({"annotators": [{"name": a.name, "roles": list(a.roles)} for a in people]}))
        return
    for a in people:
        console.print(f"{a.name:20} {', '.join(a.roles) or '(no role)'}")
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
        out = annotation_report(s, queue)
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
