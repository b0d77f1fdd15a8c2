"""Deletion steps on a real DuckDB file, no services: a user's text leaves the file itself (not only the tables),
dead letters that mention them go too, and two deletion runs at once (the app's request and its retry worker)
still compact. Before: a run that failed mid-compaction marked the file compacted anyway."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from feedback.deletion import pending_deletions, process_deletions, request_deletion
from feedback.events import ChatTurn, Message
from feedback.settings import Settings
from feedback.sink import Batch, commit_batch, insert_events
from feedback.warehouse import connect, ensure_schema


def _turn(user: str, text: str, i: int) -> ChatTurn:
    return ChatTurn(
        user_id=user,
        consent=True,
        conversation_id=f"c{i}",
        turn_id=f"t{i}",
        model_version="base",
        messages=[Message(role="user", content=text)],
        answer=text,
        latency_ms=1.0,
    )


def test_concurrent_deletion_runs_leave_no_text_in_the_file(tmp_path):
    s = Settings(home=tmp_path)
    ensure_schema(s.warehouse_path)
    marker = "quokka-7f3a9c"
    with connect(s.warehouse_path) as con:
        insert_events(
            con,
            [_turn("api:victim", f"my secret {marker}", i) for i in range(50)]
            + [_turn("api:other", "plain words " * 20, 100 + i) for i in range(500)],
        )
        dead = Batch()
        dead.add_dead_letter("t.turns", 0, 7, "schema", "bad", f'{{"user_id": "api:victim", "x": "{marker}"}}'.encode())
        commit_batch(con, dead, "g")
        con.execute("CHECKPOINT")
    assert marker.encode() in s.warehouse_path.read_bytes()
    request_deletion(s, "api:victim")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            process_deletions(s, timeout_s=30)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and pending_deletions(s) == []
    assert marker.encode() not in s.warehouse_path.read_bytes(), "deleted text stayed in the file's free blocks"
    with connect(s.warehouse_path, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM turns WHERE user_id = 'api:other'").fetchone()[0] == 500
        assert con.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM deleted_users WHERE compacted_at IS NULL").fetchone()[0] == 0


def test_a_late_copy_of_a_deleted_users_turn_is_dropped_by_the_sink(tmp_path):
    s = Settings(home=tmp_path)
    ensure_schema(s.warehouse_path)
    old = _turn("api:victim", "old words", 1).model_copy(update={"ts": datetime(2026, 1, 1, tzinfo=UTC)})
    request_deletion(s, "api:victim")
    process_deletions(s)
    with connect(s.warehouse_path) as con:
        insert_events(con, [old, _turn("api:victim", "said after the deletion", 2)])
        rows = con.execute("SELECT turn_id FROM turns").fetchall()
    assert rows == [("t2",)], "an older copy is dropped; what they say afterwards is new data"
