"""The project's own evaluation and safety sets under ``training/data/``: one reader, with the checks each needs.

The gate's suites (``redteam``, ``overrefusal``, ``refqa``, ``ifeval``, ``mc``) are written by the project and never
trained on; ``safety`` is the set the recipes MAY train on (``training/safety.py``), with its own prompts.
``tests/training/test_capability.py`` asserts that no gate item appears in any set a recipe reads.

This module imports nothing else of ``training/`` (the suite reader once lived in ``training/evaluate.py``, which
``training/safety.py`` imported: part of issue 19's import circle). A malformed row stops loading with its file and
line number, and the gate's QA, instruction and multiple-choice rows are checked for the fields they need.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data"
GATE_SUITES = ("redteam", "overrefusal", "refqa", "ifeval", "mc")  # held out: never in a training table

_REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "redteam": {"id": str, "prompt": str},
    "overrefusal": {"id": str, "prompt": str},
    "safety": {"id": str, "kind": str, "prompt": str, "answer": str, "bad": str},
    "refqa": {"id": str, "question": str, "accepted": list, "answer": str},
    "ifeval": {"id": str, "prompt": str, "instruction_ids": list, "kwargs": list},
    "mc": {"id": str, "question": str, "choices": list, "label": int},
}


class SuiteError(ValueError):
    """A suite file is missing or has a malformed row; the message names the file and the line."""


def load_suite(name: str, data_dir: Path = DATA) -> list[dict[str, Any]]:
    """Every row of ``<data_dir>/<name>.jsonl`` (blank lines skipped), checked for the fields its suite needs."""
    path = data_dir / f"{name}.jsonl"
    try:
        text = path.read_text()
    except OSError as e:
        raise SuiteError(f"cannot read {path} ({e.strerror}): restore it from git") from None
    rows, ids = [], set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise SuiteError(f"{where} is not valid JSON ({e.msg}): fix or remove that line") from None
        if not isinstance(row, dict):
            raise SuiteError(f"{where} is not a JSON object: write one object per line")
        _check(name, row, where)
        if "id" in row:
            if row["id"] in ids:
                raise SuiteError(f"{where} repeats the id {row['id']!r}: give every row its own id")
            ids.add(row["id"])
        rows.append(row)
    return rows


def _check(name: str, row: dict[str, Any], where: str) -> None:
    for key, typ in _REQUIRED.get(name, {}).items():
        if not isinstance(row.get(key), typ) or isinstance(row.get(key), bool) and typ is int:
            raise SuiteError(f"{where} needs {key!r} as {getattr(typ, '__name__', typ)}: add it")
    if name == "refqa" and not (row["accepted"] and all(isinstance(a, str) and a.strip() for a in row["accepted"])):
        raise SuiteError(f"{where}: 'accepted' must list at least one non-empty answer string")
    if name == "ifeval":
        from training.scoring import validate_instruction  # the checkers' own validation (unknown id, bad kwargs)

        if not row["instruction_ids"] or len(row["instruction_ids"]) != len(row["kwargs"]):
            raise SuiteError(f"{where}: give one kwargs object per instruction id (and at least one id)")
        for iid, kw in zip(row["instruction_ids"], row["kwargs"], strict=True):
            try:
                validate_instruction(iid, kw if isinstance(kw, dict) else {})
            except ValueError as e:
                raise SuiteError(f"{where}: {e}") from None
    if name == "mc":
        choices = row["choices"]
        if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise SuiteError(f"{where}: 'choices' must hold at least two non-empty strings")
        if not 0 <= row["label"] < len(choices):
            raise SuiteError(f"{where}: 'label' must index one of its {len(choices)} choices (0-based)")
