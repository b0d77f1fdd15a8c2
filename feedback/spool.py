"""A durable, ordered outbox on local disk: an append-only segmented log owned by one process at a time.

Every event is appended here before anything talks to Kafka, so an event survives the broker being down and
the process dying right after ``emit()`` returned (each append is one ``write()`` into the OS page cache; a
power loss can still take the last seconds, as with any log that does not fsync per record). A sender drains
the log in order and records an acknowledged position only after the broker acknowledged the records.

On disk, in ``<dir>/<name>/``: segment files ``<n>.log`` holding records
``[crc32 u32][topic_len u16][key_len i32 (-1: none)][value_len u32] topic key value``, and ``ack`` holding
``<segment> <offset>``, the first record not yet acknowledged. A record torn by a crash mid-write fails its
length or CRC check and is cut off at the next open. Fully acknowledged segments are deleted.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import zlib
from pathlib import Path

_HEADER = struct.Struct("<IHiI")
SEGMENT_BYTES = 64 * 1024 * 1024
_POS_BITS = 40  # record id = segment << 40 | end offset: ordered, and says where the record ends


class SpoolLocked(RuntimeError):
    """Another live process owns this spool; give each process its own spool name."""


class Spool:
    def __init__(self, directory: Path, name: str, segment_bytes: int = SEGMENT_BYTES):
        self.dir = Path(directory) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self._segment_bytes = segment_bytes
        self._lock_fd = os.open(self.dir / "lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLocked(f"spool {self.dir} is in use by another process; pass a different spool name") from None
        self._mu = threading.Lock()
        self._ack = self._read_ack()
        segs = self._segments()
        if not segs or segs[-1] < self._ack[0]:
            segs.append(self._ack[0])
        # Recover: count unacknowledged records, cut a torn tail off the last segment.
        self._count = 0
        for seg in segs:
            if seg < self._ack[0]:
                (self.dir / f"{seg}.log").unlink(missing_ok=True)
                continue
            start = self._ack[1] if seg == self._ack[0] else 0
            n, good_end = self._scan(seg, start)
            self._count += n
            path = self.dir / f"{seg}.log"
            if path.exists() and path.stat().st_size > good_end:
                os.truncate(path, good_end)
        self._seg = max(segs)
        self._fd = os.open(self.dir / f"{self._seg}.log", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        self._end = os.fstat(self._fd).st_size

    # ---- files ---------------------------------------------------------------------------------------
    def _segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self.dir.glob("*.log") if p.stem.isdigit())

    def _read_ack(self) -> tuple[int, int]:
        try:
            seg, off = (self.dir / "ack").read_text().split()
            return int(seg), int(off)
        except (FileNotFoundError, ValueError):
            segs = self._segments()
            return (segs[0] if segs else 1), 0

    def _write_ack(self, seg: int, off: int) -> None:
        tmp = self.dir / "ack.tmp"
        tmp.write_text(f"{seg} {off}")
        os.replace(tmp, self.dir / "ack")

    def _records(self, seg: int, start: int, stop: int | None = None, limit: int | None = None):
        """Yield (end_offset, topic, key, value) of valid records of one segment from ``start``."""
        path = self.dir / f"{seg}.log"
        if not path.exists():
            return
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read() if stop is None else f.read(max(0, stop - start))
        pos, n = 0, 0
        while pos + _HEADER.size <= len(data) and (limit is None or n < limit):
            crc, tlen, klen, vlen = _HEADER.unpack_from(data, pos)
            body_start = pos + _HEADER.size
            body_end = body_start + tlen + max(klen, 0) + vlen
            if body_end > len(data) or zlib.crc32(data[body_start:body_end]) != crc:
                return  # a torn record: the end of what was written
            topic = data[body_start:body_start + tlen].decode()
            key = None if klen < 0 else data[body_start + tlen:body_start + tlen + klen]
            value = data[body_end - vlen:body_end]
            pos = body_end
            n += 1
            yield start + pos, topic, key, value

    def _scan(self, seg: int, start: int) -> tuple[int, int]:
        n, end = 0, start
        for end, *_ in self._records(seg, start):  # noqa: B007 - the last end is the answer
            n += 1
        return n, end

    # ---- API -----------------------------------------------------------------------------------------
    @staticmethod
    def _encode(topic: str, key: bytes | None, value: bytes) -> bytes:
        t = topic.encode()
        body = t + (key or b"") + value
        return _HEADER.pack(zlib.crc32(body), len(t), -1 if key is None else len(key), len(value)) + body

    def append(self, topic: str, key: bytes | None, value: bytes) -> None:
        rec = self._encode(topic, key, value)
        with self._mu:
            if self._end >= self._segment_bytes:
                self._rotate()
            os.write(self._fd, rec)
            self._end += len(rec)
            self._count += 1

    def append_many(self, rows: list[tuple[str, bytes | None, bytes]]) -> None:
        blob = b"".join(self._encode(*r) for r in rows)
        with self._mu:
            if self._end >= self._segment_bytes:
                self._rotate()
            os.write(self._fd, blob)
            self._end += len(blob)
            self._count += len(rows)

    def _rotate(self) -> None:
        os.close(self._fd)
        self._seg += 1
        self._fd = os.open(self.dir / f"{self._seg}.log", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        self._end = 0

    def peek(self, limit: int) -> list[tuple[int, str, bytes | None, bytes]]:
        """The oldest ``limit`` unacknowledged records, as (id, topic, key, value); ids increase."""
        with self._mu:
            last_seg, last_end = self._seg, self._end
            seg, off = self._ack
        out: list[tuple[int, str, bytes | None, bytes]] = []
        while seg <= last_seg and len(out) < limit:
            stop = last_end if seg == last_seg else None
            for end, topic, key, value in self._records(seg, off, stop, limit - len(out)):
                out.append(((seg << _POS_BITS) | end, topic, key, value))
            seg, off = seg + 1, 0
        return out

    def ack_through(self, last_id: int) -> None:
        """Everything up to and including record ``last_id`` was acknowledged by the broker."""
        seg, end = last_id >> _POS_BITS, last_id & ((1 << _POS_BITS) - 1)
        with self._mu:
            old_seg, old_off = self._ack
            n = 0
            for s in range(old_seg, seg + 1):
                start = old_off if s == old_seg else 0
                stop = end if s == seg else None
                n += sum(1 for _ in self._records(s, start, stop))
            self._count -= n
            self._ack = (seg, end)
            self._write_ack(seg, end)
            for s in range(old_seg, seg):  # fully acknowledged older segments
                (self.dir / f"{s}.log").unlink(missing_ok=True)

    def __len__(self) -> int:
        with self._mu:
            return self._count

    def close(self) -> None:
        with self._mu:
            os.close(self._fd)
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
