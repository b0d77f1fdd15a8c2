"""The warehouse's shape follows the event contracts: every event field is a column of its table, and a
warehouse written by an older release gains a new column on open (CREATE TABLE IF NOT EXISTS alone would keep
the old shape and the sink would fail on the first event carrying the new field)."""

from __future__ import annotations

import duckdb
import pytest

from feedback.events import ChatTurn, Feedback, UserAction
from feedback.warehouse import TABLES, init_schema

POSITION = {"kafka_partition", "kafka_offset", "ingested_at"}


@pytest.mark.parametrize("model, table", [(ChatTurn, "turns"), (Feedback, "feedback"), (UserAction, "user_actions")])
def test_every_event_field_is_a_column_of_its_table(model, table):
    fields = set(model.model_fields) - {"type"}  # the table is the type
    columns = {c for c, _ in TABLES[table]} - POSITION
    assert fields == columns, f"{table}: only in the event {fields - columns}, only in the table {columns - fields}"


def test_an_older_warehouse_gains_new_columns_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:  # the turns table as an earlier release wrote it: no ttft_ms, no origin
        old = [(c, t) for c, t in TABLES["turns"] if c not in ("ttft_ms", "origin")]
        con.execute(f"CREATE TABLE turns ({', '.join(f'{c} {t}' for c, t in old)})")
        con.execute("INSERT INTO turns (event_id, user_id, answer) VALUES ('e1', 'u1', 'kept')")
    with duckdb.connect(str(path)) as con:
        init_schema(con)
        init_schema(con)  # idempotent
        cols = [
            r[0]
            for r in con.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'turns' ORDER BY ordinal_position"
            ).fetchall()
        ]
        assert {"ttft_ms", "origin"} <= set(cols)
        assert con.execute("SELECT answer, ttft_ms, origin FROM turns").fetchall() == [("kept", None, None)]
