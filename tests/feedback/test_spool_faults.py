"""The outbox under faults, no services: short writes, a full disk, corruption mid-segment, a size bound,
owner-only files, the fsync policy. Each test failed on the spool before these fixes."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from feedback import spool as spool_mod
from feedback.spool import Spool, SpoolFull


def _values(sp: Spool) -> list[bytes]:
    return [v for _, _, _, v in sp.peek(10_000)]


def test_short_writes_are_completed(tmp_path, monkeypatch):
    real_write = os.write

    def dribble(fd, data):  # the kernel may write less than asked: at most 7 bytes per call here
        return real_write(fd, bytes(data[:7]))

    sp = Spool(tmp_path, "s")
    monkeypatch.setattr(spool_mod.os, "write", dribble)
    for i in range(20):
        sp.append("t", b"k", f"value {i} ".encode() * 10)
    monkeypatch.undo()
    sp.close()
    again = Spool(tmp_path, "s")
    assert _values(again) == [f"value {i} ".encode() * 10 for i in range(20)]
    assert again.corrupt_regions == 0


def test_disk_full_is_a_clear_error_and_leaves_nothing_torn(tmp_path, monkeypatch):
    sp = Spool(tmp_path, "s")
    sp.append("t", None, b"before")
    real_write = os.write
    calls = {"n": 0}

    def half_then_enospc(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_mod.os, "write", half_then_enospc)
    with pytest.raises(SpoolFull, match="free disk space"):
        sp.append("t", None, b"x" * 1000)
    monkeypatch.undo()
    sp.append("t", None, b"after")  # the spool carries on once there is space again
    assert len(sp) == 2
    sp.close()
    again = Spool(tmp_path, "s")
    assert _values(again) == [b"before", b"after"], "the half-written record must be gone"
    assert again.corrupt_regions == 0


def test_corruption_mid_segment_skips_to_the_next_good_record_and_counts_it(tmp_path):
    sp = Spool(tmp_path, "s")
    for i in range(10):
        sp.append("topic", b"key", f"record-{i:02d}".encode() * 4)
    sp.close()
    seg = tmp_path / "s" / "1.log"
    data = bytearray(seg.read_bytes())
    size = len(data) // 10
    for j in range(3 * size + 5, 3 * size + 25):  # damage the middle of record 3
        data[j] ^= 0xFF
    seg.write_bytes(bytes(data))
    again = Spool(tmp_path, "s")
    got = _values(again)
    assert len(got) == 9 and b"record-03" * 4 not in got
    assert got[0] == b"record-00" * 4 and got[-1] == b"record-09" * 4, "records after the damage are kept"
    assert again.corrupt_regions == 1 and again.corrupt_bytes == size
    assert len(again) == 9
    again.ack_through(again.peek(100)[-1][0])  # acknowledging across the damaged region works
    assert len(again) == 0


def test_size_bound_refuses_new_events_while_the_broker_is_away(tmp_path):
    sp = Spool(tmp_path, "s", max_bytes=10_000)
    n = 0
    with pytest.raises(SpoolFull, match="limit"):
        while True:
            sp.append("t", None, b"y" * 500)
            n += 1
    assert 15 <= n <= 20 and len(sp) == n
    sp.ack_through(sp.peek(5)[-1][0])  # the broker took some: room again
    sp.append("t", None, b"y" * 500)
    assert sp.pending_bytes <= 10_000


def test_files_are_readable_only_by_their_owner(tmp_path):
    sp = Spool(tmp_path / "spool", "s", segment_bytes=100)
    for _ in range(5):
        sp.append("t", None, b"z" * 80)
    sp.ack_through(sp.peek(1)[0][0])
    sp.reject(sp.peek(1)[0][0], "t", None, b"z" * 80, "test")
    for p in [tmp_path / "spool", *(tmp_path / "spool").rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o077 == 0, f"{p} is {oct(mode)}"
    assert sp.rejected_records() == [("t", None, b"z" * 80)]


@pytest.mark.parametrize("policy", ["always", "interval", "never"])
def test_fsync_policy(tmp_path, monkeypatch, policy):
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(spool_mod.os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    sp = Spool(tmp_path, "s", fsync=policy, fsync_interval_s=0.0)
    for _ in range(3):
        sp.append("t", None, b"v")
    after_appends = len(synced)
    sp.sync()
    assert after_appends == (3 if policy == "always" else 0)
    assert len(synced) - after_appends == (1 if policy == "interval" else 0)
    sp.close()
