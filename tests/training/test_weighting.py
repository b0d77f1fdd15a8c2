"""A snapshot row's provenance weight reaches the trainer: each row is counted ``weight`` times (resampled, seeded),
for every recipe alike; ``data.weighting=ignore`` and all-ones weights leave the table as it is; a bad weight stops
the run with one sentence. (The rows are real parquet files in a snapshot's layout; no model is loaded.)"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feedback.settings import Settings
from training.config import config_path, load_config
from training.lineage import VersionInfo
from training.runner import Job, TrainingError


def job(tmp_path: Path, weights: list[float | None], *overrides: str) -> Job:
    snap = tmp_path / "snap"
    (snap / "sft").mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
            "model_version": "base",
            "source": "trainer" if w not in (None, 1.0) else "user",
            "judge": None,
            "weight": w,
        }
        for i, w in enumerate(weights)
    ]
    pq.write_table(pa.Table.from_pylist(rows), snap / "sft" / "train.parquet")
    path = config_path("sft")
    cfg = load_config(path, list(overrides), method="sft")
    parent = VersionInfo(name="base", number=0, kind="policy", recipe="base", path=str(tmp_path / "base"))
    settings = Settings(home=tmp_path / "home")
    return Job("sft", settings, cfg, path, {"path": str(snap)}, parent, "fp32", tmp_path / "work")


def answers(ds) -> list[str]:
    return [m[-1]["content"] for m in ds["messages"]]


def test_rows_are_counted_by_their_weight(tmp_path):
    j = job(tmp_path, [2.0, 0.0, 1.0, 3.0, None])
    ds = j.table()
    got = answers(ds)
    assert sorted(got) == sorted(["a0", "a0", "a2", "a3", "a3", "a3", "a4"])  # a1 (weight 0) is gone
    assert "weight" not in ds.column_names and "source" not in ds.column_names  # provenance stays out of the trainer
    assert j.metrics["data.rows_before_weighting"] == 5 and j.metrics["data.rows_weighted"] == 7


def test_a_fractional_weight_is_its_expected_count_and_the_draw_is_seeded(tmp_path):
    weights = [1.5] * 400
    first = answers(job(tmp_path / "a", weights, "data.max_rows=4000").table())
    again = answers(job(tmp_path / "b", weights, "data.max_rows=4000").table())
    assert first == again  # the config's seed: a rerun trains on the same rows
    assert 560 <= len(first) <= 640  # 1.5 x 400 = 600 expected; binomial(400, 0.5) sd 10
    other = answers(job(tmp_path / "c", weights, "data.max_rows=4000", "seed=7").table())
    assert other != first


def test_ignore_and_all_ones_keep_the_table(tmp_path):
    assert len(job(tmp_path / "a", [2.0, 0.0, 3.0], "data.weighting=ignore").table()) == 3
    j = job(tmp_path / "b", [1.0, 1.0, None])
    assert len(j.table()) == 3 and "data.rows_weighted" not in j.metrics


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_a_bad_weight_stops_with_one_sentence(tmp_path, bad):
    with pytest.raises(TrainingError, match="negative or non-finite weight: curate again"):
        job(tmp_path, [1.0, bad]).table()
