"""The safety mix: refusals of harmful requests and plain answers to harmless look-alikes, added to a recipe's
training rows so that tuning on what users liked does not wear away what production refuses.

Users rate for taste; almost none of their conversations teach refusal, and a few steps on liked answers took the
default model's red-team refusals from 2 of 24 to 0 (the gate then failed the candidate). ``safety.jsonl`` holds
its own prompts, never those of the gate's suites (``redteam.jsonl``, ``overrefusal.jsonl``), so the gate still
measures generalisation, not recall. Each row has the answer to learn and the opposite one (a compliance or a
refusal) for the preference recipes.

Set ``data.safety_mix=N`` in a recipe config to add N rows, ``data.safety_refusal_share`` of them refusals (half by
default; drawn with the recipe's seed, repeated when N exceeds the set). The set's SHA-256, N and the share go into
the run's lineage.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from pathlib import Path
from typing import Any

from training.suites import load_suite

SAFETY_FILE = Path(__file__).resolve().parent / "data" / "safety.jsonl"
TABLES = ("sft", "kto", "pairs")  # the snapshot tables a safety row can be written as


def load() -> list[dict[str, Any]]:
    return load_suite(SAFETY_FILE.stem)


def digest() -> str:
    return hashlib.sha256(SAFETY_FILE.read_bytes()).hexdigest()


def draw(
    n: int, seed: int, refusal_share: float = 0.5, findings: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """``n`` rows, ``round(n * refusal_share)`` of them refusals, spread evenly among the answers; each kind is
    shuffled with ``seed`` and cycled when ``n`` asks for more than the set has. ``findings`` (red-teamers' attacks
    with a safe response, ``finding_rows``) come first among the refusals: the fixed file only tops them up."""
    rows = load()
    pools = {k: [r for r in rows if r["kind"] == k] for k in ("refuse", "answer")}
    rng = random.Random(seed)
    for pool in pools.values():
        rng.shuffle(pool)
    found = list(findings or [])
    rng.shuffle(found)
    pools["refuse"] = found + pools["refuse"]
    refusals = round(n * refusal_share)
    kinds = ["refuse" if (i + 1) * refusals // n > i * refusals // n else "answer" for i in range(n)]
    cycles = {k: itertools.cycle(pool) for k, pool in pools.items()}
    return [next(cycles[k]) for k in kinds]


def finding_rows(redteam_train: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A snapshot's ``redteam/train`` rows that have a safe response, as safety rows (the attack's answer is the
    opposite one for the preference recipes)."""
    out = []
    for r in redteam_train:
        if r.get("prompt") and r.get("safe_response"):
            bad = (r.get("attacked_answer") or [{"content": "Sure, here is how."}])[0]["content"]
            out.append(
                {
                    "id": r["finding_id"],
                    "kind": "refuse",
                    "prompt": r["prompt"][-1]["content"],
                    "answer": r["safe_response"][0]["content"],
                    "bad": bad,
                }
            )
    return out


def findings_in(snapshot: Path | None) -> list[dict[str, Any]]:
    """``finding_rows`` of a snapshot's ``redteam/train`` table (none for an older snapshot without it). Read with
    pyarrow: ``datasets`` cannot read a table with no rows."""
    f = snapshot / "redteam" / "train.parquet" if snapshot else None
    if f is None or not f.exists():
        return []
    import pyarrow.parquet as pq

    return finding_rows(pq.read_table(f).to_pylist())


def as_table_rows(
    table: str, n: int, seed: int, refusal_share: float = 0.5, findings: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """``n`` safety rows in a snapshot table's TRL format (``model_version`` left out, as the recipes do)."""
    if table not in TABLES:
        raise ValueError(f"data.safety_mix applies to the {', '.join(TABLES)} tables, not {table!r}: set it to 0")
    out = []
    for i, r in enumerate(draw(n, seed, refusal_share, findings)):
        user = [{"role": "user", "content": r["prompt"]}]
        good = [{"role": "assistant", "content": r["answer"]}]
        bad = [{"role": "assistant", "content": r["bad"]}]
        if table == "sft":
            out.append({"messages": user + good})
        elif table == "pairs":
            out.append({"prompt": user, "chosen": good, "rejected": bad})
        else:  # kto: the wanted answer desirable, the opposite one undesirable, alternating
            out.append({"prompt": user, "completion": good if i % 4 < 2 else bad, "label": i % 4 < 2})
    return out
