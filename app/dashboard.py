"""The ops dashboard: a Gradio page at ``/ops/`` on the product's own server, for operators only (``/ops``
redirects there).

It shows the loop end to end: thumbs-up rate over time per version (95% Wilson bands), the release plan in
force and its history, the latest canary analysis, the candidates waiting for release (with an Approve button
for ``FLYWHEEL_RELEASE_POLICY=approve``), dataset snapshots with their filter counts and yield, the trained
versions with their evaluation and gate, and lineage from a release back to its snapshot, the Kafka offsets it
came from and a sample of the conversations that trained it; and the AI trainers: submissions per hour, queue depth,
agreement by day and per axis, and a leaderboard of those who did not opt out. Links go to the Prefect and MLflow UIs.

Access: Gradio's login form with any user name and the admin token (``FLYWHEEL_ADMIN_TOKEN``) as password;
without a configured token nobody gets in. What it shows comes from ``app.ops_data``, which reads what the
pipelines wrote (the app never imports them). Everything user-written is shown in tables and JSON viewers, never
as markup. The Approve button records an approval that the release autopilot acts on at its next look.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import matplotlib

from app.auth import is_admin
from app.ops_data import (
    annotation_status,
    approvals,
    approve_candidate,
    autopilot_status,
    history_rows,
    latest_analysis,
    lineage,
    release_records,
    snapshot_rows,
    snapshots,
    thumbs_series,
    version_rows,
    versions,
    waiting_rows,
)
from feedback.settings import Settings

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend

PATH = "/ops"


# ---------------------------------------------------------------------------------------------------------
# Figures (matplotlib, rendered to images by gr.Plot)
# ---------------------------------------------------------------------------------------------------------
def _fig(title: str):
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=90)
    ax.set_title(title, fontsize=10)
    return fig, ax


def fig_thumbs(series: list[dict[str, Any]]):
    fig, ax = _fig("Thumbs-up rate per version (95% Wilson band)")
    for v in sorted({r["version"] for r in series}):
        pts = [r for r in series if r["version"] == v]
        t = [r["time"] for r in pts]
        ax.plot(t, [r["rate"] for r in pts], marker="o", label=f"{v} (n={sum(r['n'] for r in pts)})")
        ax.fill_between(t, [r["lo"] for r in pts], [r["hi"] for r in pts], alpha=0.2)
    ax.set_ylim(0, 1)
    ax.set_ylabel("thumbs up")
    if series:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no ratings yet", ha="center", transform=ax.transAxes)
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def fig_plan(records: list[dict[str, Any]]):
    fig, ax = _fig("Candidate's share of users, per release")
    changes = [r for r in records if r.get("plan") is not None]
    for rid in dict.fromkeys(r["release_id"] for r in changes):
        pts = [r for r in changes if r["release_id"] == rid]
        ax.step(
            [r["at"] for r in pts],
            [r["share"] for r in pts],
            where="post",
            marker="o",
            label=f"{pts[0]['candidate']} ({pts[-1]['status']})",
        )
    ax.set_ylim(-0.05, 1.05)
    if changes:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no releases yet", ha="center", transform=ax.transAxes)
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def fig_canary(a: dict[str, Any] | None):
    fig, ax = _fig("Canary analysis: thumbs-up and side-by-side wins (95% intervals)")
    if not a:
        ax.text(0.5, 0.5, "no canary analysis yet", ha="center", transform=ax.transAxes)
        return fig
    arms = [a["production"], a["candidate"]]
    for i, metric in enumerate(("thumbs", "wins")):
        for j, arm in enumerate(arms):
            r = arm[metric]
            if r["n"]:
                x = i * 3 + j
                ax.bar(x, r["rate"], color=("tab:blue", "tab:orange")[j], label=arm["version"] if i == 0 else None)
                ax.errorbar(x, r["rate"], yerr=[[r["rate"] - r["lo"]], [r["hi"] - r["rate"]]], color="black", capsize=4)
    ax.set_xticks([0.5, 3.5], ["thumbs-up rate", "side-by-side wins"])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_yield(manifest: dict[str, Any] | None):
    fig, ax = _fig("Latest snapshot: where the ratings went")
    y = (manifest or {}).get("yield")
    if not y:
        ax.text(0.5, 0.5, "no snapshot with a yield report yet", ha="center", transform=ax.transAxes)
        return fig
    labels = ["ratings in", *y["ratings_lost"], "usable", *(f"rows: {t}" for t in y["training_rows_out"])]
    values = [y["ratings_in"], *y["ratings_lost"].values(), y["ratings_usable"], *y["training_rows_out"].values()]
    ax.barh(
        range(len(values)),
        values,
        color=["tab:gray"]
        + ["tab:red"] * len(y["ratings_lost"])
        + ["tab:green"]
        + ["tab:blue"] * len(y["training_rows_out"]),
    )
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------
def fig_trainers(status: dict[str, Any]):
    """Submissions per hour (bars) and Krippendorff's alpha of the rankings by day (line, right axis)."""
    from datetime import UTC, datetime

    fig, ax = _fig(f"AI trainers: submissions per hour; queue {sum(status['depth'].values())} open")
    hours = [datetime.fromtimestamp(t, UTC) for t, _ in status["per_hour"]]
    ax.bar(hours, [n for _, n in status["per_hour"]], width=1 / 30, color="tab:blue", label="submissions / hour")
    ax.set_ylabel("submissions")
    days = status["agreement_by_day"]
    if days:
        right = ax.twinx()
        right.plot([datetime.fromisoformat(d).replace(tzinfo=UTC) for d in days], list(days.values()), "o-",
                   color="tab:orange", label="alpha (rankings) by day")  # fmt: skip
        right.set_ylabel("Krippendorff's alpha")
        right.set_ylim(-1, 1)
    fig.autofmt_xdate()
    return fig


def trainers_section() -> tuple[Any, Any, Any]:
    """The AI trainers' row: the figure, agreement per axis, and the leaderboard (opted-out names left out)."""
    with gr.Row():
        plot = gr.Plot(label="AI trainers", elem_id="ops-trainers")
    agree = gr.JSON(label="Agreement (Krippendorff's alpha per axis and for rankings)")
    board = gr.Dataframe(
        headers=["annotator", "judgments", "gold right", "trust"],
        label="Leaderboard (annotators who opted out are not shown)",
        wrap=True,
        elem_id="ops-leaderboard",
    )
    return plot, agree, board


def trainers_outputs(settings: Settings) -> tuple:
    status = annotation_status(settings)
    return fig_trainers(status), status["agreement"], status["leaderboard"]


def approve_handler(settings: Settings):
    """The Approve button: record the operator's approval, then show the waiting list again."""

    def on_approve(version: str | None, request: gr.Request) -> tuple:
        msg = approve_candidate(settings, version, getattr(request, "username", None))
        return msg, waiting_rows(autopilot_status(settings), approvals(settings))

    return on_approve


def build_dashboard(settings: Settings) -> gr.Blocks:
    prefect = f"http://{settings.prefect_host}:{settings.prefect_port}"
    mlflow = f"http://{settings.mlflow_host}:{settings.mlflow_port}"
    with gr.Blocks(title="Flywheel ops", analytics_enabled=False) as page:
        gr.Markdown(
            f"## Flywheel operations\n[Prefect flows]({prefect}) · [MLflow registry]({mlflow}) · "
            "[chat](/) · refreshes every 30 s"
        )
        refresh = gr.Button("Refresh", size="sm")
        with gr.Row():
            thumbs = gr.Plot(label="Thumbs-up over time", elem_id="ops-thumbs")
        with gr.Row():
            plan = gr.Plot(label="Release plan history", elem_id="ops-plan")
            canary = gr.Plot(label="Canary analysis", elem_id="ops-canary")
        current = gr.JSON(label="Current release and latest look")
        history = gr.Dataframe(
            headers=["at UTC", "release", "action", "by", "candidate", "production", "share", "why"],
            label="Release history",
            wrap=True,
        )
        waiting = gr.Dataframe(
            headers=["candidate", "recipe", "snapshot", "registered UTC", "gate", "approval"],
            label="Candidates waiting for release (the autopilot's latest look)",
            wrap=True,
            elem_id="ops-waiting",
        )
        with gr.Row():
            to_approve = gr.Dropdown(  # custom values too: the handler checks the autopilot's list itself
                label="Approve a waiting candidate", choices=[], allow_custom_value=True, elem_id="ops-approve-pick"
            )
            approve = gr.Button("Approve", variant="primary", elem_id="ops-approve")
        approve_msg = gr.Markdown(elem_id="ops-approve-msg")
        with gr.Row():
            yields = gr.Plot(label="Snapshot yield", elem_id="ops-yield")
        snaps = gr.Dataframe(
            headers=["snapshot", "created UTC", "status", "rows", "ratings in", "usable", "filters (in->out)"],
            label="Dataset snapshots",
            wrap=True,
        )
        runs = gr.Dataframe(
            headers=["version", "recipe", "parent", "snapshot", "gate", "aliases", "tainted", "eval"],
            label="Trained versions and evaluations",
            wrap=True,
        )
        with gr.Row():
            pick = gr.Dropdown(label="Lineage of version", choices=[], allow_custom_value=False)
        lineage_json = gr.JSON(label="Lineage: version -> releases -> snapshot -> Kafka offsets")
        sample = gr.Dataframe(
            headers=["prompt", "chosen", "rejected", "model_version"],
            label="Sample of the conversations that trained it",
            wrap=True,
        )
        trainers = trainers_section()

        def load() -> tuple:
            recs = release_records(settings)
            latest = latest_analysis(settings)
            snaps_ = snapshots(settings)
            vs = versions(settings)
            cur = None
            if recs:
                last = [r for r in recs if r["action"] != "applied"][-1]
                cur = {
                    "release": {
                        k: last[k] for k in ("release_id", "candidate", "production", "status", "share", "paused")
                    },
                    "plan": last.get("plan"),
                    "latest_look": latest,
                }
            names = [v.get("name") for v in vs]
            status = autopilot_status(settings)
            approved = approvals(settings)
            pending = [c["version"] for c in (status or {}).get("waiting", []) if c["version"] not in approved]
            if status is not None:
                cur = {**(cur or {}), "policy": status.get("policy"), "autopilot_look": status.get("at")}
            return (
                fig_thumbs(thumbs_series(settings)),
                fig_plan(recs),
                fig_canary(latest),
                cur or {},
                history_rows(recs),
                waiting_rows(status, approved),
                gr.Dropdown(choices=pending, value=pending[0] if pending else None),
                fig_yield(snaps_[-1] if snaps_ else None),
                snapshot_rows(snaps_),
                version_rows(vs),
                gr.Dropdown(choices=names, value=names[-1] if names else None),
                *trainers_outputs(settings),
            )

        outputs = [thumbs, plan, canary, current, history, waiting, to_approve, yields, snaps, runs, pick, *trainers]
        page.load(load, outputs=outputs)
        refresh.click(load, outputs=outputs)
        gr.Timer(30).tick(load, outputs=outputs)

        approve.click(approve_handler(settings), inputs=to_approve, outputs=[approve_msg, waiting], api_name="approve")
        pick.change(lambda v: lineage(settings, v), inputs=pick, outputs=[lineage_json, sample])
    return page


def mount_dashboard(app: Any, settings: Settings) -> Any:
    """Mount the page at ``/ops/`` behind the admin token, and ``/ops`` redirecting to it (call before the chat UI
    is mounted at ``/``, which would otherwise answer ``/ops`` with its 404)."""
    from starlette.responses import RedirectResponse

    def operator(_user: str, token: str) -> bool:
        return is_admin(settings, token)

    def to_page(request: Any) -> RedirectResponse:
        return RedirectResponse(request.url.replace(path=f"{request.url.path}/"))

    app.add_route(PATH, to_page, methods=["GET", "HEAD"])
    return gr.mount_gradio_app(
        app,
        build_dashboard(settings),
        path=PATH,
        auth=operator,
        ssr_mode=False,
        show_error=False,
        auth_message="Operators only: any user name, the admin token as password.",
    )


__all__ = ["PATH", "build_dashboard", "mount_dashboard"]
