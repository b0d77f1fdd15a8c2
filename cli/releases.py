"""``flywheel releases list|show|approve|start|promote|rollback|pause|resume|run``: staged rollouts from the
terminal.

    flywheel releases list [--json]                     # releases, and candidates waiting for one
    flywheel releases show [RELEASE_ID] [--json]        # state, history, the latest canary analysis
    flywheel releases approve sft-0004 --token $TOKEN   # policy approve: the autopilot may release it
    flywheel releases start dpo-0003 --token $TOKEN     # canary at the first step's share, now
    flywheel releases promote [--full] --token $TOKEN   # next ramp step (or straight to everyone)
    flywheel releases rollback --reason "..." --token $TOKEN
    flywheel releases pause|resume --token $TOKEN       # stop / restart automatic decisions
    flywheel releases run                               # the controller loop in the foreground

Changing a release is an operator action: it needs the admin token (``--token`` or ``FLYWHEEL_OPERATOR_TOKEN``),
checked against the server's ``FLYWHEEL_ADMIN_TOKEN``; without a configured token every change is refused.
In the running product the autopilot (``pipelines.autopilot``, a service of ``flywheel up``) releases gate-passed
candidates by itself, in registered order; under ``FLYWHEEL_RELEASE_POLICY=approve`` each waits for ``approve``.
"""

from __future__ import annotations

import getpass
import json
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from feedback.settings import get_settings

releases_app = typer.Typer(help="Staged rollouts: canary -> ramp -> full, or rollback.", no_args_is_help=True)
console = Console()
JSON = typer.Option(False, "--json", help="Print JSON.")
TOKEN = typer.Option("", "--token", envvar="FLYWHEEL_OPERATOR_TOKEN", help="The admin token (operator actions).")
REASON = typer.Option("", "--reason", help="Why (recorded with the change).")


def _fail(msg: str, as_json: bool, code: int = 1) -> None:
    if as_json:
        print(json.dumps({"ok": False, "error": msg}))
    else:
        console.print(f"[red]{msg}[/red]")
    raise typer.Exit(code)


def _operator(token: str, as_json: bool) -> str:
    from app.auth import is_admin

    s = get_settings()
    if s.admin_token is None:
        _fail("refused: no admin token is configured (set FLYWHEEL_ADMIN_TOKEN where the controller runs)", as_json)
    if not is_admin(s, token):
        _fail("refused: operator actions need the admin token (--token or FLYWHEEL_OPERATOR_TOKEN)", as_json)
    return f"operator:{getpass.getuser()}"


def _controller():
    from pipelines.release import Controller

    return Controller(get_settings())


def _state_dict(st) -> dict[str, Any]:
    d = st.model_dump(mode="json", exclude={"last", "pending"})
    d["pending"] = st.pending.seq if st.pending else None
    d["last_change"] = {k: st.last.model_dump(mode="json")[k] for k in ("seq", "at", "action", "actor", "reason")}
    return d


def _act(fn, as_json: bool) -> None:
    from pipelines.release import ReleaseError

    try:
        st = fn()
    except ReleaseError as e:
        _fail(str(e), as_json)
    if as_json:
        print(json.dumps({"ok": True, "release": _state_dict(st)}, indent=2))
    else:
        console.print(
            f"release {st.release_id}: {st.candidate} {st.status} at {st.share:.0%} of users "
            f"(production {st.production}){' [yellow]paused[/yellow]' if st.paused else ''}; "
            f"{st.last.action} by {st.last.actor}: {st.last.reason}"
        )


def _policy() -> str:
    """The policy the running autopilot uses (its status file), else this process's FLYWHEEL_RELEASE_POLICY."""
    from pipelines.autopilot import read_status
    from pipelines.config import ReleaseConfig

    st = read_status(get_settings())
    if st and st.get("policy"):
        return st["policy"]
    try:
        return ReleaseConfig().policy
    except ValueError:
        return "auto"


def _queue() -> tuple[Any, str | None]:
    """The waiting and held candidates (None and why, when the registry cannot be read)."""
    from pipelines.release_queue import build_queue

    try:
        return build_queue(get_settings(), _policy()), None
    except Exception as e:  # noqa: BLE001 - the release history is still worth showing
        return None, f"candidates unknown: the registry could not be read ({type(e).__name__}: {e})"


def _queue_dict(q) -> dict[str, Any]:
    return {
        "policy": q.policy,
        "production": q.production,
        "waiting": [c.model_dump(mode="json") for c in q.waiting],
        "held": [h.model_dump(mode="json") for h in q.held],
        "next": (n.version if (n := q.next()) else None),
    }


def _print_queue(q, err: str | None) -> None:
    if q is None:
        console.print(f"[yellow]{err}[/yellow]")
        return
    if not q.waiting and not q.held:
        console.print(f"no candidates waiting (policy {q.policy}; production {q.production})")
        return
    t = Table("candidate", "recipe", "snapshot", "registered UTC", "state", title=f"candidates (policy {q.policy})")
    for c in q.waiting:
        if c.approval is not None:
            state = f"approved by {c.approval.actor}"
        else:
            state = "waiting for approval" if q.policy == "approve" else "waiting for its turn"
        t.add_row(c.version, c.recipe, c.snapshot_id or "-", (c.created_at or "")[:19], state)
    for h in q.held:
        t.add_row(h.version, "", "", "", f"held: {h.why}")
    console.print(t)


@releases_app.command("list")
def list_cmd(as_json: bool = JSON) -> None:
    """Every release, oldest first (candidate, production, status, share of users), and the candidates waiting."""
    from pipelines.release import ReleaseLog

    rels = ReleaseLog(get_settings()).releases()
    q, err = _queue()
    if as_json:
        print(
            json.dumps(
                {"releases": [_state_dict(r) for r in rels], "candidates": _queue_dict(q) if q else {"error": err}},
                indent=2,
            )
        )
        return
    _print_queue(q, err)
    if not rels:
        console.print("no releases yet: `flywheel releases start <version> --token ...`")
        return
    t = Table("release", "started UTC", "candidate", "production", "status", "share", "last change")
    for r in rels:
        status = r.status + (" (paused)" if r.paused else "") + (" (pending)" if r.pending else "")
        t.add_row(
            r.release_id,
            r.started_at.isoformat()[:19],
            r.candidate,
            r.production,
            status,
            f"{r.share:.0%}",
            f"{r.last.action} by {r.last.actor}",
        )
    console.print(t)


@releases_app.command("show")
def show_cmd(
    release_id: str = typer.Argument("", help="A release id (default: the latest)."), as_json: bool = JSON
) -> None:
    """One release: its state, every recorded change (who, why, statistics), the latest canary analysis."""
    from pipelines.release import ReleaseLog, latest_analysis

    s = get_settings()
    lg = ReleaseLog(s)
    rels = lg.releases()
    st = next((r for r in rels if r.release_id == release_id), None) if release_id else (rels[-1] if rels else None)
    if st is None and not release_id:  # nothing released yet: what waits is the news
        q, err = _queue()
        if as_json:
            print(json.dumps({"release": None, "candidates": _queue_dict(q) if q else {"error": err}}, indent=2))
            return
        console.print("no releases yet")
        _print_queue(q, err)
        return
    if st is None:
        _fail(f"no release {release_id!r}: see `flywheel releases list`", as_json)
    history = [r for r in lg.records() if r.release_id == st.release_id]
    latest = latest_analysis(s)
    latest = latest if latest and latest.get("release_id") == st.release_id else None
    q, err = _queue() if not release_id else (None, None)
    if as_json:
        out = {
            "release": _state_dict(st),
            "history": [r.model_dump(mode="json") for r in history],
            "latest_analysis": latest,
        }
        if not release_id:
            out["candidates"] = _queue_dict(q) if q else {"error": err}
        print(json.dumps(out, indent=2, default=str))
        return
    console.print(
        f"[bold]{st.release_id}[/bold] {st.candidate} vs {st.production}: {st.status} at {st.share:.0%}"
        f"{' (paused)' if st.paused else ''}; salt {st.salt[:8]}"
    )
    t = Table("#", "at UTC", "action", "by", "share", "why")
    for r in history:
        if r.action != "applied":
            t.add_row(
                str(r.seq),
                r.at.isoformat()[:19],
                r.action + ("" if r.applied else " (pending)"),
                r.actor,
                f"{r.share:.0%}",
                r.reason[:120],
            )
    console.print(t)
    if latest:
        c, p = latest["candidate"], latest["production"]
        console.print(f"latest look ({latest['at'][:19]}): {latest['decision']}: {'; '.join(latest['reasons'])}")
        for arm in (c, p):
            th = arm["thumbs"]
            rate = f"{th['rate']:.1%} [{th['lo']:.1%}, {th['hi']:.1%}]" if th["n"] else "-"
            console.print(
                f"  {arm['version']}: thumbs-up {rate} of {th['n']}, answers {arm['answers']}, "
                f"errors {arm['errors']['k']}, median latency {arm['latency_ms']['p50']} ms"
            )
    if not release_id:
        _print_queue(q, err)


@releases_app.command("approve")
def approve_cmd(
    version: str = typer.Argument(..., help="A gate-passed candidate waiting for release, e.g. sft-0004."),
    token: str = TOKEN,
    reason: str = REASON,
    as_json: bool = JSON,
) -> None:
    """Let the autopilot release a waiting candidate (policy approve); it starts the canary when its turn comes."""
    from pipelines.release import ReleaseError
    from pipelines.release_queue import approve

    actor = _operator(token, as_json)
    policy = _policy()
    try:
        c = approve(get_settings(), version, actor, reason, policy=policy)
    except ReleaseError as e:
        _fail(str(e), as_json)
    note = "" if policy == "approve" else " (policy auto: gate-passed candidates need no approval)"
    if as_json:
        print(json.dumps({"ok": True, "candidate": c.model_dump(mode="json"), "policy": policy}, indent=2))
    else:
        console.print(
            f"approved {c.version} by {c.approval.actor}: the autopilot starts its canary when its turn comes{note}"
        )


@releases_app.command("start")
def start_cmd(
    version: str = typer.Argument(..., help="A gate-passed model version, e.g. dpo-0003."),
    token: str = TOKEN,
    reason: str = REASON,
    as_json: bool = JSON,
) -> None:
    """Send a candidate to canary (the first step's share of users)."""
    actor = _operator(token, as_json)
    _act(lambda: _controller().start(version, actor, reason), as_json)


@releases_app.command("promote")
def promote_cmd(
    full: bool = typer.Option(False, "--full", help="Straight to every user."),
    token: str = TOKEN,
    reason: str = REASON,
    as_json: bool = JSON,
) -> None:
    """Move the release in progress to its next ramp step (or to everyone)."""
    actor = _operator(token, as_json)
    _act(lambda: _controller().promote(actor, reason or "manual promote", full=full), as_json)


@releases_app.command("rollback")
def rollback_cmd(token: str = TOKEN, reason: str = REASON, as_json: bool = JSON) -> None:
    """Send every user back to production now."""
    actor = _operator(token, as_json)
    _act(lambda: _controller().rollback(actor, reason or "manual rollback"), as_json)


@releases_app.command("pause")
def pause_cmd(token: str = TOKEN, reason: str = REASON, as_json: bool = JSON) -> None:
    """Stop automatic decisions; the plan in force stays."""
    actor = _operator(token, as_json)
    _act(lambda: _controller().pause(actor, reason or "paused by operator"), as_json)


@releases_app.command("resume")
def resume_cmd(token: str = TOKEN, reason: str = REASON, as_json: bool = JSON) -> None:
    """Restart automatic decisions."""
    actor = _operator(token, as_json)
    _act(lambda: _controller().pause(actor, reason or "resumed by operator", paused=False), as_json)


@releases_app.command("run")
def run_cmd(
    max_minutes: float = typer.Option(0.0, help="Stop after this long (0: until the release ends)."),
    as_json: bool = JSON,
) -> None:
    """The controller loop in the foreground: look every poll_s, promote or roll back; resumes recorded state."""
    ctl = _controller()

    def show(st, a) -> None:
        if a is not None and not as_json:
            console.print(f"{st.candidate} {st.status} {st.share:.0%}: {a.decision}: {'; '.join(a.reasons)}")

    st = ctl.run(max_s=max_minutes * 60 or None, on_look=show)
    if as_json:
        print(json.dumps({"ok": True, "release": _state_dict(st) if st else None}, indent=2))
    elif st is None:
        console.print("no release to run: `flywheel releases start <version> --token ...`")
