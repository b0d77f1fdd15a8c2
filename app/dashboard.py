"""The ops dashboard: a Gradio page at ``/ops`` on the product's own server, for operators only.

It shows the loop end to end: thumbs-up rate over time per version (95% Wilson bands), the release plan in
force and its history, the latest canary analysis, dataset snapshots with their filter counts and yield, the
trained versions with their evaluation and gate, and lineage from a release back to its snapshot, the Kafka
offsets it came from and a sample of the conversations that trained it. Links go to the Prefect and MLflow UIs.

Access: Gradio's login form with any user name and the admin token (``FLYWHEEL_ADMIN_TOKEN``) as password;
without a configured token nobody gets in. The app must not import ``pipelines/`` or ``training/``, so this page
reads what they write, as files and tables: ``releases/log.jsonl`` and ``latest_analysis.json``, snapshot
manifests and Parquet files, ``lineage.json`` beside each version's weights, and the warehouse (through
``feedback.warehouse.connect``, which takes turns with the ingest writer). Everything user-written is shown in
tables and JSON viewers, never as markup.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import gradio as gr
import matplotlib
import pyarrow.parquet as pq
from scipy import stats

from app.auth import is_admin
from feedback.settings import Settings
from feedback.warehouse import WarehouseBusy, connect

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend

log = logging.getLogger(__name__)
PATH = "/ops"
SAMPLE_ROWS = 5


# ---------------------------------------------------------------------------------------------------------
# Reading what the pipelines wrote
# ---------------------------------------------------------------------------------------------------------
def wilson(k: int, n: int) -> tuple[float | None, float | None, float | None]:
    if n <= 0:
        return None, None, None
    ci = stats.binomtest(int(k), int(n)).proportion_ci(0.95, method="wilson")
    return k / n, float(ci.low), float(ci.high)


def release_records(settings: Settings) -> list[dict[str, Any]]:
    path = settings.home / "releases" / "log.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line while the controller writes
    return out


def latest_analysis(settings: Settings) -> dict[str, Any] | None:
    path = settings.home / "releases" / "latest_analysis.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def thumbs_series(settings: Settings, bucket_s: int = 300) -> list[dict[str, Any]]:
    """Thumbs-up rate per version per time bucket (latest thumbs per rater and answer; cleared = unrated)."""
    if not settings.warehouse_path.exists():
        return []
    try:
        with connect(settings.warehouse_path, read_only=True, timeout_s=10) as con:
            have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            if "feedback" not in have:
                return []
            rows = con.execute(f"""
                WITH latest AS (SELECT * EXCLUDE (rn) FROM (
                    SELECT *, row_number() OVER (PARTITION BY user_id, turn_id ORDER BY ts DESC, event_id DESC) AS rn
                    FROM feedback WHERE kind = 'thumbs') WHERE rn = 1)
                SELECT time_bucket(INTERVAL '{int(bucket_s)} seconds', ts) AS b, model_version,
                       count(*) FILTER (WHERE value = 'up'), count(*)
                FROM latest WHERE value IN ('up', 'down') GROUP BY ALL ORDER BY b, model_version""").fetchall()
    except (WarehouseBusy, OSError) as e:
        log.warning("dashboard: warehouse unavailable: %s", e)
        return []
    return [
        {"time": b, "version": v, "up": k, "n": n, **dict(zip(("rate", "lo", "hi"), wilson(k, n), strict=True))}
        for b, v, k, n in rows
    ]


def snapshots(settings: Settings) -> list[dict[str, Any]]:
    out = []
    if settings.datasets_dir.exists():
        for d in settings.datasets_dir.iterdir():
            m = d / "manifest.json"
            if d.is_dir() and not d.name.startswith(".") and m.exists():
                try:
                    man = json.loads(m.read_text())
                except ValueError:
                    continue
                man["path"] = str(d)
                man["retired"] = (d / "RETIRED.json").exists()
                out.append(man)
    return sorted(out, key=lambda m: m.get("created_at", ""))


def versions(settings: Settings) -> list[dict[str, Any]]:
    """Every version's lineage.json (the app's copy of the registry record)."""
    out = []
    if settings.models_dir.exists():
        for d in sorted(settings.models_dir.iterdir()):
            f = d / "lineage.json"
            if d.is_dir() and f.exists():
                try:
                    out.append(json.loads(f.read_text()))
                except ValueError:
                    continue
    return sorted(out, key=lambda v: v.get("number", 0))


def conversation_sample(settings: Settings, snapshot_id: str, n: int = SAMPLE_ROWS) -> list[dict[str, Any]]:
    """A few training rows of a snapshot (pairs first, else SFT), as plain text columns."""
    snap = settings.datasets_dir / snapshot_id
    for rel, cols in (("pairs/train.parquet", ("prompt", "chosen", "rejected")), ("sft/train.parquet", ("messages",))):
        f = snap / rel
        if f.exists():
            rows = pq.read_table(f).slice(0, n).to_pylist()
            return [
                {c: "\n".join(f"{m['role']}: {m['content']}" for m in r[c]) for c in cols if c in r}
                | {"model_version": r.get("model_version", "")}
                for r in rows
            ]
    return []


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
# Tables
# ---------------------------------------------------------------------------------------------------------
def history_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            r["at"][:19],
            r["release_id"],
            r["action"] + ("" if r.get("applied", True) else " (pending)"),
            r["actor"],
            r["candidate"],
            r["production"],
            f"{r['share']:.0%}",
            r.get("reason", ""),
        ]
        for r in reversed(records)
        if r["action"] != "applied"
    ]


def snapshot_rows(snaps: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for m in reversed(snaps):
        c, y = m.get("counts", {}), m.get("yield") or {}
        filters = "; ".join(f"{f['stage']} {f['in']}->{f['out']}" for f in m.get("filters", []))
        rows.append(
            [
                m["snapshot_id"],
                m.get("created_at", "")[:19],
                "retired" if m["retired"] else "ok",
                json.dumps({t: sum(s.values()) for t, s in c.items()}),
                y.get("ratings_in"),
                y.get("ratings_usable"),
                filters,
            ]
        )
    return rows


def version_rows(vs: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            v.get("name"),
            v.get("recipe"),
            v.get("parent"),
            v.get("snapshot_id"),
            v.get("gate"),
            ", ".join(v.get("aliases") or []),
            "yes" if v.get("tainted") else "",
            json.dumps(v.get("eval") or {})[:300],
        ]
        for v in reversed(vs)
    ]


def lineage(settings: Settings, version: str | None) -> tuple[dict[str, Any], list[list[Any]]]:
    """A version's record, its releases, its snapshot's source (events and Kafka offsets), and sample rows."""
    vs = {v.get("name"): v for v in versions(settings)}
    v = vs.get(version or "")
    if v is None:
        return {"error": "choose a version"}, []
    snap_id = v.get("snapshot_id")
    man = next((m for m in snapshots(settings) if m["snapshot_id"] == snap_id), None)
    out = {
        "version": {
            k: v.get(k)
            for k in (
                "name",
                "recipe",
                "parent",
                "snapshot_id",
                "gate",
                "gate_reasons",
                "tainted",
                "created_at",
                "code_revision",
            )
        },
        "releases": [
            {k: r[k] for k in ("at", "release_id", "action", "actor", "share", "reason")}
            for r in release_records(settings)
            if r["candidate"] == version and r["action"] != "applied"
        ],
        "snapshot": None
        if man is None
        else {
            "snapshot_id": snap_id,
            "counts": man.get("counts"),
            "source": man.get("source"),
            "yield": man.get("yield"),
        },
    }
    sample = conversation_sample(settings, snap_id) if snap_id else []
    return out, [
        [r.get("prompt") or r.get("messages"), r.get("chosen", ""), r.get("rejected", ""), r.get("model_version")]
        for r in sample
    ]


# ---------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------
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
            return (
                fig_thumbs(thumbs_series(settings)),
                fig_plan(recs),
                fig_canary(latest),
                cur or {},
                history_rows(recs),
                fig_yield(snaps_[-1] if snaps_ else None),
                snapshot_rows(snaps_),
                version_rows(vs),
                gr.Dropdown(choices=names, value=names[-1] if names else None),
            )

        outputs = [thumbs, plan, canary, current, history, yields, snaps, runs, pick]
        page.load(load, outputs=outputs)
        refresh.click(load, outputs=outputs)
        gr.Timer(30).tick(load, outputs=outputs)
        pick.change(lambda v: lineage(settings, v), inputs=pick, outputs=[lineage_json, sample])
    return page


def mount_dashboard(app: Any, settings: Settings) -> Any:
    """Mount the page at ``/ops`` behind the admin token (call before the chat UI is mounted at ``/``)."""

    def operator(_user: str, token: str) -> bool:
        return is_admin(settings, token)

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
