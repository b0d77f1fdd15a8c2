"""Trained test fixtures, built once per code-and-config and kept on disk between suite runs.

Why: the suite's trained fixtures (the gate's four tiny trainings, the train flow's checkpoints, the judge) take
minutes to build and are the same from one run to the next unless the code or the config that produced them
changed. ``cached_dir`` keys each fixture by a SHA-256 of its config and of every file its code globs match, so an
edit to training code always rebuilds it (a stale entry is never used), and the suite says so when it builds.

An entry is built in a temporary directory and renamed into place only when complete, under a file lock per key,
so a killed build leaves nothing that a later run would use and two pytest-xdist workers asking at once build it
once. Entries live under ``~/.cache/flywheel/fixtures/<name>-<key>`` (``FLYWHEEL_FIXTURE_CACHE`` overrides). Their
files are made read-only: a test copies an entry (``restore``) before it changes anything in it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]

# What a trained fixture depends on: the code that trains, curates, registers and evaluates, and the pinned tree.
DEFAULT_CODE: tuple[str, ...] = (
    "training/**/*.py",
    "training/configs/**",
    "training/data/**",
    "pipelines/**/*.py",
    "feedback/**/*.py",
    "pyproject.toml",
    "constraints.txt",
)
MARKER = ".fixture.json"  # written last, inside the temporary directory, before the rename that publishes it
LOG = "builds.log"  # one line per build, read by tests/conftest.py's terminal summary (works across xdist workers)
STALE_AFTER_S = 3600.0  # another key of the same fixture unused this long is deleted after a build (disk stays bounded)
_SKIP_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache"}


def cache_root() -> Path:
    """Where entries live: ``FLYWHEEL_FIXTURE_CACHE``, else ``~/.cache/flywheel/fixtures``."""
    env = os.environ.get("FLYWHEEL_FIXTURE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flywheel" / "fixtures"


def code_files(code: Sequence[str], root: Path = REPO) -> list[Path]:
    """Every file the globs match under ``root``, sorted; a glob that matches a directory takes all files in it."""
    found: set[Path] = set()
    for pattern in code:
        for match in root.glob(pattern):
            candidates: Iterable[Path] = match.rglob("*") if match.is_dir() else (match,)
            for f in candidates:
                rel = f.relative_to(root)
                if f.is_file() and not _SKIP_PARTS & set(rel.parts) and f.suffix != ".pyc":
                    found.add(f)
    return sorted(found)


def cache_key(config: dict, code: Sequence[str] = DEFAULT_CODE, root: Path = REPO) -> str:
    """SHA-256 (first 16 hex digits) over the config as canonical JSON and each code file's path and content."""
    h = hashlib.sha256()
    try:
        h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    except TypeError as e:
        raise TypeError(f"a fixture config must be plain JSON (str, int, float, bool, list, dict): {e}") from e
    for f in code_files(code, root):
        h.update(b"\0" + str(f.relative_to(root)).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def files_digest(directory: Path, exclude: Sequence[str] = ("meta.json",)) -> str:
    """SHA-256 of the top-level files of a directory (a model's weights, config and tokenizer), for a fixture's
    ``config``: a different base model is a different fixture. ``meta.json`` holds only when it was prepared."""
    h = hashlib.sha256()
    for f in sorted(p for p in directory.iterdir() if p.is_file() and p.name not in exclude):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]


def cached_dir(
    name: str,
    build: Callable[[Path], None],
    *,
    config: dict,
    code: Sequence[str] = DEFAULT_CODE,
    root: Path = REPO,
) -> Path:
    """The directory that ``build(tmpdir)`` fills, built only when no complete entry for this key exists.

    The returned directory is shared by every test and every later run: read it, or ``restore`` a copy to change.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"fixture name {name!r} must be a plain non-empty file name (no '/', no leading dot)")
    key = cache_key(config, code, root)
    base = cache_root()
    base.mkdir(parents=True, exist_ok=True)
    entry = base / f"{name}-{key}"
    if _complete(entry):
        _touch(entry)
        return entry
    with FileLock(str(base / f".{name}-{key}.lock")):
        if _complete(entry):  # another worker built it while this one waited for the lock
            _touch(entry)
            return entry
        _say(base, f"fixture {name}: building (code or config changed) -> {entry}")
        if entry.exists():  # a directory without its marker was never published by this module: never use it
            _rmtree(entry)
        tmp = base / f".tmp-{name}-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        started = time.monotonic()
        try:
            build(tmp)
            (tmp / MARKER).write_text(
                json.dumps(
                    {"name": name, "key": key, "config": config, "built_s": round(time.monotonic() - started, 1)}
                )
            )
            _read_only(tmp)
            os.rename(tmp, entry)  # atomic on one file system: the entry appears complete or not at all
        except BaseException:
            _rmtree(tmp)
            raise
        _say(base, f"fixture {name}: built in {time.monotonic() - started:.1f} s")
    _prune(base, name, keep=entry)
    return entry


def restore(entry: Path, dest: Path) -> Path:
    """A writable copy of a cached entry at ``dest`` (without the marker), for a test that changes what it holds."""
    shutil.copytree(entry, dest, copy_function=shutil.copyfile, ignore=shutil.ignore_patterns(MARKER))
    return dest


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdef" for c in s)


def _complete(entry: Path) -> bool:
    return (entry / MARKER).is_file()


def _touch(entry: Path) -> None:
    try:
        os.utime(entry / MARKER)  # last use, for pruning
    except OSError:
        pass


def _say(base: Path, line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    with open(base / LOG, "a") as f:
        f.write(f"{time.time():.3f} {line}\n")


def _read_only(tmp: Path) -> None:
    for f in tmp.rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(f.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _prune(base: Path, name: str, keep: Path) -> None:
    """Delete the other keys of this fixture unused for an hour (and their lock files), and temporary directories
    abandoned by killed builds (a live build holds its key's lock; one older than a day is dead)."""
    now = time.time()
    for other in base.glob(f"{name}-*"):
        suffix = other.name[len(name) + 1 :]
        if other == keep or not other.is_dir() or len(suffix) != 16 or not _is_hex(suffix):  # not this fixture's
            continue
        marker = other / MARKER
        try:
            last = marker.stat().st_mtime if marker.exists() else other.stat().st_mtime
        except OSError:
            continue
        if now - last > STALE_AFTER_S:
            _rmtree(other)
    for lock in base.glob(f".{name}-*.lock"):  # a key's lock file outlives its entry: drop it with the entry
        key = lock.name[len(name) + 2 : -len(".lock")]
        try:
            if len(key) == 16 and _is_hex(key) and not (base / f"{name}-{key}").exists():
                if now - lock.stat().st_mtime > STALE_AFTER_S:
                    lock.unlink()
        except OSError:
            continue
    for tmp in base.glob(f".tmp-{name}-*"):
        suffix = tmp.name[len(name) + 6 :]
        if len(suffix) != 25 or not _is_hex(suffix.replace("-", "")):
            continue
        try:
            if now - tmp.stat().st_mtime > 86_400:
                _rmtree(tmp)
        except OSError:
            continue
