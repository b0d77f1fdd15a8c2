"""A durable, ordered outbox on local disk: an append-only segmented log owned by one process at a time.

Every event is appended here before anything talks to Kafka, so an event survives the broker being down and
the process dying right after ``emit()`` returned. A sender drains the log in order and records an
acknowledged position only after the broker acknowledged the records.

On disk, in ``<dir>/<name>/`` (directory 0700, files 0600: events hold users' text): segment files ``<n>.log``
holding records ``[crc32 u32][topic_len u16][key_len i32 (-1: none)][value_len u32] topic key value``,
``ack`` holding ``<segment> <offset>`` (the first record not yet acknowledged), and ``rejected.log`` (same
format) for records the broker refused for good, so one poison record never blocks the records behind it.

What can go wrong, and what happens:

- *Short writes*: ``write()`` may write less than asked; the rest is written in a loop.
- *Disk full* (or any write error): the partial record is cut off again (``ftruncate`` to the previous end),
  so nothing torn stays behind, and ``SpoolFull`` says what happened and what to do. The caller refuses the
  request clearly; nothing is silently dropped.
- *A size bound*: with ``max_bytes``, appends beyond that many unacknowledged bytes raise ``SpoolFull`` (the
  broker has been away long enough that the disk must not fill up).
- *A torn tail* (a crash mid-write) fails its length or CRC check and is cut off at the next open.
- *Corruption in the middle* of a segment (a bad block, a bit flip): the reader scans forward to the next record
  whose header is plausible and whose CRC matches, skips the damaged bytes, and counts them
  (``corrupt_regions``, ``corrupt_bytes``; logged once per region). The records around it are kept.
- *Durability* is a policy (``fsync``): ``always`` (fdatasync per append: survives power loss, costs ~ms),
  ``interval`` (the sender thread syncs at most every ``interval_s``: a power loss can take that much),
  ``never`` (the OS decides; a process crash still loses nothing, since the data is in the page cache).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<IHiI")
SEGMENT_BYTES = 64 * 1024 * 1024
_POS_BITS = 40  # record id = segment << 40 | end offset: ordered, and says where the record ends
_MAX_TOPIC = 255
_MAX_KEY = 1 << 20
_MAX_VALUE = 1 << 30
FsyncPolicy = Literal["always", "interval", "never"]
DIR_MODE = 0o700
FILE_MODE = 0o600


class SpoolLocked(RuntimeError):
    """Another live process owns this spool; give each process its own spool name."""


class SpoolFull(OSError):
    """The outbox cannot take this event (disk full, size bound reached, write error). Nothing was written."""


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(path, DIR_MODE)


def _open_private(path: Path, flags: int) -> int:
    fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` may write less than asked (signals, quotas, nearly full disks): loop until all is written."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write() wrote nothing")
        view = view[n:]


class Spool:
    def __init__(
        self,
        directory: Path,
        name: str,
        segment_bytes: int = SEGMENT_BYTES,
        max_bytes: int | None = None,
        fsync: FsyncPolicy = "never",
        fsync_interval_s: float = 0.2,
    ):
        _private_dir(Path(directory))
        self.dir = Path(directory) / name
        _private_dir(self.dir)
        self._segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self._lock_fd = _open_private(self.dir / "lock", os.O_RDWR)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLocked(f"spool {self.dir} is in use by another process; pass a different spool name") from None
        self._mu = threading.Lock()
        self.corrupt_regions = 0
        self.corrupt_bytes = 0
        self.rejected = 0
        self._seen_corrupt: set[tuple[int, int]] = set()
        self._dirty = False
        self._last_sync = time.monotonic()
        self._ack = self._read_ack()
        segs = self._segments()
        if not segs or segs[-1] < self._ack[0]:
            segs.append(self._ack[0])
        # Recover: count unacknowledged records (skipping damaged regions), cut a torn tail off each segment.
        self._count = 0
        for seg in segs:
            path = self.dir / f"{seg}.log"
            if seg < self._ack[0]:
                path.unlink(missing_ok=True)
                continue
            start = self._ack[1] if seg == self._ack[0] else 0
            n, good_end = self._scan(seg, start)
            self._count += n
            if path.exists():
                os.chmod(path, FILE_MODE)
                if path.stat().st_size > good_end:
                    os.truncate(path, good_end)
        self._seg = max(segs)
        self._fd = _open_private(self.dir / f"{self._seg}.log", os.O_WRONLY | os.O_APPEND)
        self._end = os.fstat(self._fd).st_size
        self._bytes = self._unacked_bytes()

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
        fd = _open_private(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            _write_all(fd, f"{seg} {off}".encode())
            if self.fsync == "always":
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.dir / "ack")

    def _unacked_bytes(self) -> int:
        seg0, off0 = self._ack
        total = 0
        for s in self._segments():
            if s >= seg0:
                total += (self.dir / f"{s}.log").stat().st_size - (off0 if s == seg0 else 0)
        return max(0, total)

    @staticmethod
    def _plausible(data: bytes, pos: int) -> tuple[int, int, int, int] | None:
        """The record at ``pos`` if its header is sane, its body fits and its CRC matches, else None."""
        if pos + _HEADER.size > len(data):
            return None
        crc, tlen, klen, vlen = _HEADER.unpack_from(data, pos)
        if tlen == 0 or tlen > _MAX_TOPIC or klen < -1 or klen > _MAX_KEY or vlen > _MAX_VALUE:
            return None
        body_start = pos + _HEADER.size
        body_end = body_start + tlen + max(klen, 0) + vlen
        if body_end > len(data) or zlib.crc32(data[body_start:body_end]) != crc:
            return None
        return tlen, klen, vlen, body_end

    def _resync(self, data: bytes, pos: int) -> int | None:
        """The next position after ``pos`` where a valid record starts, or None (a torn tail)."""
        for p in range(pos + 1, len(data) - _HEADER.size + 1):
            if self._plausible(data, p) is not None:
                return p
        return None

    def _records(
        self, seg: int, start: int, stop: int | None = None, limit: int | None = None
    ) -> Iterator[tuple[int, str, bytes | None, bytes]]:
        """Yield (end_offset, topic, key, value) of valid records of one segment from ``start``, skipping
        damaged regions (counted once each) and stopping at a torn tail."""
        path = self.dir / f"{seg}.log"
        if not path.exists():
            return
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read() if stop is None else f.read(max(0, stop - start))
        pos, n = 0, 0
        while pos + _HEADER.size <= len(data) and (limit is None or n < limit):
            rec = self._plausible(data, pos)
            if rec is None:
                nxt = self._resync(data, pos)
                if nxt is None:
                    return  # a torn record: the end of what was written
                self._note_corrupt(seg, start + pos, nxt - pos)
                pos = nxt
                continue
            tlen, klen, vlen, body_end = rec
            body_start = pos + _HEADER.size
            topic = data[body_start : body_start + tlen].decode(errors="replace")
            key = None if klen < 0 else data[body_start + tlen : body_start + tlen + klen]
            value = data[body_end - vlen : body_end]
            pos = body_end
            n += 1
            yield start + pos, topic, key, value

    def _note_corrupt(self, seg: int, at: int, skipped: int) -> None:
        if (seg, at) in self._seen_corrupt:
            return
        self._seen_corrupt.add((seg, at))
        self.corrupt_regions += 1
        self.corrupt_bytes += skipped
        log.error(
            "spool %s: %d damaged bytes in segment %d at offset %d were skipped (records in them are lost); "
            "the records after them are kept",
            self.dir,
            skipped,
            seg,
            at,
        )

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
        """Append one record durably (per the fsync policy), or raise ``SpoolFull`` having written nothing."""
        self._append_blob(self._encode(topic, key, value), 1)

    def append_many(self, rows: list[tuple[str, bytes | None, bytes]]) -> None:
        self._append_blob(b"".join(self._encode(*r) for r in rows), len(rows))

    def _append_blob(self, blob: bytes, n: int) -> None:
        with self._mu:
            if self.max_bytes is not None and self._bytes + len(blob) > self.max_bytes:
                raise SpoolFull(
                    errno.ENOSPC,
                    f"the event outbox {self.dir} already holds {self._bytes:,} bytes waiting for Kafka "
                    f"(limit {self.max_bytes:,}); the broker has been unreachable too long: start it "
                    "(flywheel kafka start) and the outbox drains",
                )
            if self._end >= self._segment_bytes:
                self._rotate()
            try:
                _write_all(self._fd, blob)
                if self.fsync == "always":
                    os.fdatasync(self._fd)
            except OSError as e:
                self._cut_back()
                raise SpoolFull(
                    e.errno or errno.EIO,
                    f"could not write to the event outbox {self.dir}: {e.strerror or e}; "
                    "free disk space there (or set FLYWHEEL_SPOOL_DIR) and retry",
                ) from e
            self._end += len(blob)
            self._bytes += len(blob)
            self._count += n
            self._dirty = self.fsync != "always"

    def _cut_back(self) -> None:
        """After a failed write: remove whatever part of the record reached the file (nothing torn stays)."""
        try:
            os.ftruncate(self._fd, self._end)
        except OSError:
            log.exception("spool %s: could not cut a partial record; it is skipped at the next open", self.dir)

    def _rotate(self) -> None:
        os.close(self._fd)
        self._seg += 1
        self._fd = _open_private(self.dir / f"{self._seg}.log", os.O_WRONLY | os.O_APPEND)
        self._end = 0

    def sync(self, force: bool = False) -> None:
        """The ``interval`` policy: called by the sender thread; syncs at most every ``fsync_interval_s``."""
        if self.fsync == "never" or not self._dirty:
            return
        now = time.monotonic()
        if not force and now - self._last_sync < self.fsync_interval_s:
            return
        with self._mu:
            fd, self._dirty = self._fd, False
            os.fdatasync(fd)
        self._last_sync = now

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
            self._bytes = self._unacked_bytes()

    def reject(self, record_id: int, topic: str, key: bytes | None, value: bytes, reason: str) -> None:
        """Move the oldest unacknowledged record (the one the broker refuses for good) to ``rejected.log`` and
        acknowledge it, so the records behind it flow again. The reason is logged; the bytes are kept."""
        fd = _open_private(self.dir / "rejected.log", os.O_WRONLY | os.O_APPEND)
        try:
            _write_all(fd, self._encode(topic, key, value))
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self.ack_through(record_id)
        self.rejected += 1
        log.error(
            "spool %s: the broker refuses a %d-byte record for %s for good (%s); kept in rejected.log",
            self.dir,
            len(value),
            topic,
            reason,
        )

    def rejected_records(self) -> list[tuple[str, bytes | None, bytes]]:
        path = self.dir / "rejected.log"
        if not path.exists():
            return []
        data = path.read_bytes()
        out, pos = [], 0
        while (rec := self._plausible(data, pos)) is not None:
            tlen, klen, vlen, body_end = rec
            b = pos + _HEADER.size
            out.append(
                (
                    data[b : b + tlen].decode(),
                    None if klen < 0 else data[b + tlen : b + tlen + klen],
                    data[body_end - vlen : body_end],
                )
            )
            pos = body_end
        return out

    @property
    def pending_bytes(self) -> int:
        with self._mu:
            return self._bytes

    def __len__(self) -> int:
        with self._mu:
            return self._count

    def close(self) -> None:
        with self._mu:
            if self.fsync != "never" and self._dirty:
                os.fdatasync(self._fd)
            os.close(self._fd)
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
