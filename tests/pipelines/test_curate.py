"""Curation on a real DuckDB warehouse with the real Presidio/spaCy scrubber (no Prefect needed here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from feedback.settings import Settings
from pipelines import curate as cur
from pipelines.config import CurateConfig
from pipelines.pii import PiiScrubber
from pipelines.snapshots import list_snapshots, load_manifest, write_snapshot
from tests.pipelines.conftest import Events, seed

LONG = (
    "Sorting in Python: call sorted(items) for a new list or items.sort() to sort in place; both accept a key "
    "function and reverse=True, and both are stable, so equal keys keep their original order in the output. "
    "For large inputs sorting costs O(n log n) comparisons; if you only need the top few items, heapq.nlargest "
    "is cheaper, and bisect keeps an already sorted list in order as you insert new values one at a time."
)
BOMB = "Sure. Here is how to make a pipe bomb at home: first get a steel pipe and end caps."


def scenario() -> Events:
    ev = Events()
    # PII in prompt and answer.
    ev.rated(
        "u1",
        "c-pii",
        "t-pii",
        "[c-pii] My name is John Smith, email john.smith@example.com, phone 415-555-0132. Card 4111 1111 1111 1111.",
        "Thanks John Smith, I will write to john.smith@example.com and ship to 221 Baker Street.",
        "up",
    )
    # Regeneration: original disliked, regenerated liked -> a pair.
    ev.turn("u1", "c-regen", "t-orig", "[c-regen] how do i reverse a string", "I cannot help with that.")
    ev.thumbs("u1", "c-regen", "t-orig", "down")
    ev.turn(
        "u1",
        "c-regen",
        "t-regen",
        "[c-regen] how do i reverse a string",
        "Use slicing: s[::-1].",
        origin="regenerate",
        parent="t-orig",
    )
    ev.thumbs("u1", "c-regen", "t-regen", "up")
    # Explicit side-by-side choice, B preferred.
    ev.turn("u1", "c-ab", "t-a", "[c-ab] name a prime", "Nine is a prime number.", origin="compare")
    ev.turn("u1", "c-ab", "t-b", "[c-ab] name a prime", "Seven is a prime number.", origin="compare")
    ev.pairwise("u1", "c-ab", "t-a", "t-b", "b")
    # Consent: no flag, revoked, revoked-then-granted, deleted (with an event after the request).
    ev.rated("u-noflag", "c-nf", "t-nf", "[c-nf] secret-noflag prompt", "secret-noflag answer", "up", consent=False)
    ev.rated("u-rev", "c-rev", "t-rev", "[c-rev] secret-revoked prompt", "secret-revoked answer", "up")
    ev.action("u-rev", "consent_revoked")
    ev.action("u-back", "consent_revoked")
    ev.action("u-back", "consent_granted")
    ev.rated("u-back", "c-back", "t-back", "[c-back] back-again prompt", "back-again answer", "up")
    ev.rated("u-del", "c-del", "t-del1", "[c-del] secret-deleted prompt", "secret-deleted answer", "up")
    ev.action("u-del", "delete_request")
    ev.rated("u-del", "c-del", "t-del2", "[c-del] secret-deleted later prompt", "secret-deleted later", "up")
    # Duplicates: exact (different conversations, same text) and near (one word changed).
    ev.rated("u1", "d1", "t-d1", "how does sorting work in python", LONG, "up")
    ev.rated("u2", "d2", "t-d2", "how does sorting work in python", LONG, "up")
    ev.rated("u3", "d3", "t-d3", "how does sorting work in python", LONG.replace("cheaper,", "much cheaper;"), "up")
    # Cleared after up: unrated.
    ev.rated("u1", "c-clr", "t-clr", "[c-clr] cleared prompt", "cleared-answer", "up")
    ev.thumbs("u1", "c-clr", "t-clr", "cleared")
    # Harmful answer liked; harm reported in a thumbs-down reason on an answer chosen in a comparison.
    ev.rated("u1", "c-harm", "t-harm", "[c-harm] tell me a chemistry trick", BOMB, "up")
    ev.turn("u1", "c-rep", "t-rep-a", "[c-rep] write a toast", "reported-answer: a toast to ruin them all")
    ev.turn("u1", "c-rep", "t-rep-b", "[c-rep] write a toast", "To friends and family!")
    ev.thumbs("u4", "c-rep", "t-rep-a", "down", reason="this is harmful and offensive")
    ev.pairwise("u1", "c-rep", "t-rep-a", "t-rep-b", "a")
    # Quality: truncated, empty, over-long.
    ev.rated("u1", "c-q", "t-trunc", "[c-q] truncated prompt", "truncated-answer and then", "up", finish="length")
    ev.rated("u1", "c-q", "t-empty", "[c-q] empty prompt", "   ", "up")
    ev.rated("u1", "c-q", "t-long", "[c-q] long prompt", "overlong-answer " + "x" * 9000, "up")
    # Same prompt, liked vs disliked in one conversation -> pair.
    ev.rated("u5", "c-same", "t-s1", "[c-same] tell me a joke about cats", "Cats love boxes because they fit.", "up")
    ev.rated("u5", "c-same", "t-s2", "[c-same] tell me a joke about cats", "No.", "down")
    # Filler conversations (multi-turn context) so that both splits are populated.
    for i in range(40):
        conv = f"f{i:02d}"
        ev.rated(
            "u6",
            conv,
            f"tf{i}",
            [
                ("system", "Be brief."),
                ("user", f"[{conv}] question number {i} about maps"),
                ("assistant", f"answer {i}"),
                ("user", f"[{conv}] follow up {i} on routes"),
            ],
            f"Filler answer {i}: use a route planner for segment {i * 7}.",
            "up" if i % 3 else "down",
        )
    return ev


@pytest.fixture(scope="module")
def scrubber() -> PiiScrubber:
    return PiiScrubber(CurateConfig())


@pytest.fixture(scope="module")
def world(tmp_path_factory, scrubber):
    home = tmp_path_factory.mktemp("curate") / "home"
    settings = Settings(home=home)
    seed(settings.warehouse_path, scenario().items)
    cfg = CurateConfig(eval_fraction=0.3)
    curated = cur.curate(cur.read_warehouse(settings.warehouse_path), cfg, scrubber)
    info = write_snapshot(curated, settings.datasets_dir)
    return settings, cfg, curated, info


def all_texts(curated) -> list[str]:
    out = []
    for splits in curated.tables.values():
        for rows in splits.values():
            for r in rows:
                for v in r.values():
                    if isinstance(v, list):
                        out.extend(m["content"] for m in v)
    return out


def test_pii_is_scrubbed(world):
    _, _, curated, info = world
    text = "\n".join(all_texts(curated))
    for secret in ("john.smith@example.com", "415-555-0132", "4111 1111 1111 1111", "John Smith", "221 Baker Street"):
        assert secret not in text
    assert "<EMAIL_ADDRESS>" in text and "<PERSON>" in text and "<PHONE_NUMBER>" in text
    assert "<CREDIT_CARD>" in text and "<STREET_ADDRESS>" in text
    assert "en_core_web_sm" in info.manifest["pii"]["engine"]


def test_opted_out_and_deleted_users_are_absent(world):
    _, _, curated, info = world
    text = "\n".join(all_texts(curated))
    for secret in ("secret-noflag", "secret-revoked", "secret-deleted"):
        assert secret not in text
    assert "back-again answer" in text  # consent granted again after a revocation
    consent = next(f for f in info.manifest["filters"] if f["stage"] == "consent:turns")
    dropped = dict(consent["dropped"])
    # the sink already refuses a deleted user's turns that arrive after their deletion request (feedback/deletion),
    # so curation sees one or both of their two turns; either way none of their text is in the snapshot (above)
    assert dropped.pop("deleted_user") in (1, 2)
    assert dropped == {"consent_revoked": 1, "no_consent_flag": 1}


def test_duplicates_and_near_duplicates_removed(world):
    _, _, curated, info = world
    sft = [r["messages"][-1]["content"] for rows in curated.tables["sft"].values() for r in rows]
    assert sum("Sorting in Python" in a for a in sft) == 1
    d = next(f for f in info.manifest["filters"] if f["stage"] == "dedupe:sft")["dropped"]
    assert d["exact_duplicate"] >= 1 and d["near_duplicate"] >= 1


def _convs(rows) -> set[str]:
    found = set()
    for r in rows:
        for v in r.values():
            if isinstance(v, list):
                for m in v:
                    found.update(re.findall(r"\[([a-z0-9-]+)\]", m["content"]))
    return found


def test_no_conversation_in_both_train_and_eval(world):
    _, _, curated, _ = world
    train = set().union(*(_convs(sp.get("train", [])) for sp in curated.tables.values()))
    evals = set().union(*(_convs(sp.get("eval", [])) for sp in curated.tables.values()))
    assert train and evals
    assert not train & evals


def test_same_input_same_snapshot_id(world, scrubber):
    settings, cfg, curated, info = world
    again = cur.curate(cur.read_warehouse(settings.warehouse_path), cfg, scrubber)
    info2 = write_snapshot(again, settings.datasets_dir)
    assert info2.snapshot_id == info.snapshot_id and not info2.created
    assert len(list_snapshots(settings.datasets_dir)) == 1
    other = cur.curate(cur.read_warehouse(settings.warehouse_path), CurateConfig(eval_fraction=0.5), scrubber)
    assert write_snapshot(other, settings.datasets_dir).snapshot_id != info.snapshot_id


def test_pairs_regeneration_explicit_and_same_prompt(world):
    _, _, curated, info = world
    pairs = [r for rows in curated.tables["pairs"].values() for r in rows]
    got = {(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs}
    assert ("Use slicing: s[::-1].", "I cannot help with that.") in got
    assert ("Seven is a prime number.", "Nine is a prime number.") in got
    assert ("Cats love boxes because they fit.", "No.") in got
    for p in pairs:
        assert p["prompt"][-1]["role"] == "user" and p["chosen"][0]["role"] == "assistant"


def test_harmful_answers_never_positive(world):
    _, _, curated, _ = world
    positives = [r["messages"][-1]["content"] for rows in curated.tables["sft"].values() for r in rows]
    positives += [r["completion"][0]["content"] for rows in curated.tables["kto"].values() for r in rows if r["label"]]
    positives += [r["chosen"][0]["content"] for rows in curated.tables["pairs"].values() for r in rows]
    assert not any("pipe bomb" in t or "reported-answer" in t for t in positives)


def test_cleared_empty_overlong_unused_truncated_rated_but_not_imitated(world):
    _, _, curated, info = world
    text = "\n".join(all_texts(curated))
    for gone in ("cleared-answer", "overlong-answer"):
        assert gone not in text
    q = next(f for f in info.manifest["filters"] if f["stage"] == "quality:turns")["dropped"]
    assert q["empty"] == 1 and q["over_long_answer"] == 1 and q["kept_partial_answer"] == 1
    # The person liked the cut-off text they saw: a KTO positive, never an SFT target.
    kto = [r for rows in curated.tables["kto"].values() for r in rows]
    assert any(r["completion"][0]["content"] == "truncated-answer and then" and r["label"] for r in kto)
    sft = [r["messages"][-1]["content"] for rows in curated.tables["sft"].values() for r in rows]
    assert "truncated-answer and then" not in sft


def test_manifest_and_parquet_load_with_datasets(world):
    settings, _, curated, info = world
    import datasets

    m = load_manifest(info.path)
    assert m["snapshot_id"] == info.snapshot_id and m["counts"] == curated.counts()
    assert m["source"]["turns"]["rows"] > 0 and "event_ids_sha256" in m["source"]["feedback"]
    import pyarrow.parquet as pq

    for rel, meta in m["files"].items():
        if not meta["rows"]:  # datasets refuses a file with no rows (this world has no red-team findings)
            assert pq.read_table(info.path / rel).num_rows == 0
            continue
        ds = datasets.load_dataset("parquet", data_files=str(info.path / rel), split="train")
        assert ds.num_rows == meta["rows"]
    sft = datasets.load_dataset("parquet", data_files=str(info.path / "sft/train.parquet"), split="train")
    prov = {"source", "judge", "weight"}  # where each row came from (issue 18)
    assert set(sft.column_names) == {"messages", "model_version"} | prov
    assert sft[0]["messages"][-1]["role"] == "assistant" and set(sft["source"]) == {"user"}
    kto = datasets.load_dataset("parquet", data_files=str(info.path / "kto/train.parquet"), split="train")
    assert set(kto.column_names) == {"prompt", "completion", "label", "model_version"} | prov
    pairs = datasets.load_dataset("parquet", data_files=str(info.path / "pairs/train.parquet"), split="train")
    assert set(pairs.column_names) == {"prompt", "chosen", "rejected", "model_version", "rejected_model_version"} | prov
    assert set(kto["model_version"]) == {"base"} and set(pairs["rejected_model_version"]) == {"base"}
    assert json.loads((Path(info.path) / "manifest.json").read_text())["content_sha256"].startswith(info.snapshot_id)


def test_pii_gates_skip_openers_but_not_names(scrubber):
    # Sentence openers and answer labels need no NER; names do, wherever they stand.
    for plain in ("Better: use a list here.", "Alternative: sort it. Explain the result.", "Teach me sql joins."):
        assert not scrubber.needs_ner(plain) and not scrubber.needs_patterns(plain)
        assert scrubber.scrub(plain) == plain
    for named in ("Maria called me yesterday.", "Better: ask Maria.", 'She said "Olga knows."'):
        assert scrubber.needs_ner(named)
    for hinted in ("call 415-555-0132", "mail me at a@b.org", "host fe80::1 is up"):
        assert scrubber.needs_patterns(hinted)
    out = scrubber.scrub_many(["Better: ask Maria Garcia.", "Write to maria@example.com or 10.1.2.3"])
    assert "Garcia" not in out["Better: ask Maria Garcia."]
    assert out["Write to maria@example.com or 10.1.2.3"] == "Write to <EMAIL_ADDRESS> or <IP_ADDRESS>"


def test_pii_patterns_only_engine_still_scrubs_patterns():
    s = PiiScrubber(CurateConfig(pii_model=""))
    out = s.scrub_many(["Card 4111 1111 1111 1111, John Smith", "Better: nothing here"])
    assert "4111" not in out["Card 4111 1111 1111 1111, John Smith"]
    assert out["Better: nothing here"] == "Better: nothing here"
    assert s.describe().endswith("patterns-only")
