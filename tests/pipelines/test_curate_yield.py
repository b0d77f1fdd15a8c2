"""Curation yield: ratings of answers cut at the token limit are used (the person judged what they saw), every
rating is accounted for in the manifest's yield report, and every row keeps the release that wrote it."""

from __future__ import annotations

from feedback.events import Feedback
from feedback.settings import Settings
from pipelines import curate as cur
from pipelines.config import CurateConfig
from pipelines.pii import PiiScrubber
from pipelines.snapshots import write_snapshot
from tests.pipelines.conftest import Events, seed


def _scenario() -> Events:
    ev = Events()
    for i in range(12):  # like the simulated session in the issue: many answers cut at max_tokens
        conv = f"c{i}"
        finish = "length" if i % 3 else "stop"
        ev.turn("u1", conv, f"a{i}", f"question {i} about rivers", f"long answer {i} " * 8, finish=finish)
        ev.turn("u1", conv, f"b{i}", f"question {i} about rivers", f"short answer {i}.", origin="compare")
        ev.thumbs("u1", conv, f"a{i}", "down", "Too long")
        ev.pairwise("u1", conv, f"a{i}", f"b{i}", "b")
    ev.turn("u2", "cx", "err", "question x", "half an ans", finish="error")
    ev.thumbs("u2", "cx", "err", "up")
    ev.thumbs("u2", "cx", "missing-turn", "up")
    ev.turn("u3", "cy", "cl", "question y", "fine answer.")
    ev.thumbs("u3", "cy", "cl", "up")
    ev.thumbs("u3", "cy", "cl", "cleared")
    return ev


def _with_version(ev: Events, turn_id: str, version: str) -> None:
    ev.items = [
        e.model_copy(update={"model_version": version}) if getattr(e, "turn_id", None) == turn_id else e
        for e in ev.items
    ]


def test_truncated_answers_count_and_every_rating_is_accounted(tmp_path):
    settings = Settings(home=tmp_path / "home")
    ev = _scenario()
    _with_version(ev, "b0", "dpo-0001")
    seed(settings.warehouse_path, ev.items)
    curated = cur.curate(
        cur.read_warehouse(settings.warehouse_path),
        CurateConfig(eval_fraction=0.0, pii_model=""),
        PiiScrubber(CurateConfig(pii_model="")),
    )
    y = curated.yield_report
    n_fb = sum(isinstance(e, Feedback) for e in ev.items)
    assert y["ratings_in"] == n_fb == 28
    # Every rating is either usable or lost for a named reason (a cleared thumbs supersedes its up: 2 ratings).
    assert y["ratings_usable"] + sum(y["ratings_lost"].values()) == n_fb
    assert y["ratings_lost"] == {
        "superseded_by_later_rating": 1,
        "cleared": 1,
        "turn_unavailable:generation_error": 1,
        "turn_unavailable:turn_never_ingested": 1,
    }
    assert y["ratings_usable"] == 24  # all 12 thumbs-down of truncated/finished long answers and 12 choices
    assert y["training_rows_out"]["kto"] == 12 and y["training_rows_out"]["pairs"] == 12
    pairs = curated.tables["pairs"]["train"]
    assert {(p["model_version"], p["rejected_model_version"]) for p in pairs} == {
        ("base", "base"),
        ("dpo-0001", "base"),
    }
    info = write_snapshot(curated, settings.datasets_dir)
    assert info.manifest["yield"] == y
