"""One vocabulary: the values that SQL in the pipelines, the app and the data plane compares event columns with
are the values `feedback/events.py` defines. A renamed rating value or origin fails here, naming the file and the
stray literal, instead of silently matching no rows in curation or the release analysis."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

from feedback.events import FinishReason, Origin, RatingKind, RatingValue, UserActionKind

REPO = Path(__file__).resolve().parents[2]
VOCABULARY = {
    "value": set(get_args(RatingValue)),
    "kind": set(get_args(RatingKind)),
    "origin": set(get_args(Origin)),
    "finish_reason": set(get_args(FinishReason)),
    "action": set(get_args(UserActionKind)),
}
# `value = 'up'`, `f.kind <> 'thumbs'`, `value IN ('up', 'down')`: a column of the vocabulary against literals
COMPARISON = re.compile(
    r"\b(?:\w+\.)?(value|kind|origin|finish_reason|action)\s*(?:=|<>|!=|\bIN\b|\bNOT IN\b)"
    r"\s*\(?((?:\s*'[^']*'\s*,?)+)\)?",
    re.IGNORECASE,
)
SOURCES = sorted(p for d in ("pipelines", "app", "feedback", "training", "cli") for p in (REPO / d).rglob("*.py"))


def literals_in(text: str) -> list[tuple[str, str]]:
    return [
        (m.group(1).lower(), lit) for m in COMPARISON.finditer(text) for lit in re.findall(r"'([^']*)'", m.group(2))
    ]


def test_the_scanner_finds_what_it_should():
    sql = "WHERE f.kind = 'thumbs' AND value IN ('up', 'down') AND origin <> 'compare'"
    assert literals_in(sql) == [("kind", "thumbs"), ("value", "up"), ("value", "down"), ("origin", "compare")]


def test_sql_compares_event_columns_only_with_defined_values():
    stray = {
        str(p.relative_to(REPO)): bad
        for p in SOURCES
        if (bad := [(col, lit) for col, lit in literals_in(p.read_text()) if lit not in VOCABULARY[col]])
    }
    assert not stray, f"not in feedback/events.py's vocabulary: {stray}"


def test_the_pipelines_do_compare_rating_values_in_sql():
    """The scan is not vacuous: curation and the release analysis really filter on these columns."""
    found = {lit for p in SOURCES if "pipelines" in p.parts for _, lit in literals_in(p.read_text())}
    assert {"up", "down", "thumbs", "pairwise"} <= found
