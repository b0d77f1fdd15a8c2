"""The on-disk fixture cache: a code or config change rebuilds, a half-built entry is never used, and two
processes asking for the same key at once build it once. Each test has its own cache root and its own "repo"."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.fixture_cache import MARKER, cache_key, cached_dir, restore

CODE = ("pkg/**/*.py", "configs/**", "pins.txt")


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLYWHEEL_FIXTURE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "repo"
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "sub" / "train.py").write_text("LR = 1e-4\n")
    (root / "configs" / "sft").mkdir(parents=True)
    (root / "configs" / "sft" / "tiny.yaml").write_text("steps: 2\n")
    (root / "pins.txt").write_text("torch==2.15.0\n")
    (root / "README.md").write_text("not code\n")
    return root


class Builder:
    """Counts its builds and writes one file, as a training fixture writes its checkpoint."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, out: Path) -> None:
        self.calls += 1
        (out / "model.txt").write_text(f"build {self.calls}")


def test_hit_reuses_and_entry_is_read_only(repo: Path, capsys: pytest.CaptureFixture) -> None:
    b = Builder()
    first = cached_dir("judge", b, config={"steps": 2}, code=CODE, root=repo)
    assert "fixture judge: building (code or config changed)" in capsys.readouterr().err
    again = cached_dir("judge", b, config={"steps": 2}, code=CODE, root=repo)
    assert (first, b.calls) == (again, 1)
    assert "building" not in capsys.readouterr().err
    assert first.parent == repo.parent / "cache" and first.name.startswith("judge-")
    assert (first / "model.txt").read_text() == "build 1"
    assert not os.access(first / "model.txt", os.W_OK) or os.geteuid() == 0  # root ignores the mode bits
    assert not (first / "model.txt").stat().st_mode & 0o222
    copy = restore(first, repo.parent / "copy")
    (copy / "model.txt").write_text("changed by a test")
    assert (first / "model.txt").read_text() == "build 1" and not (copy / MARKER).exists()


def test_code_change_invalidates(repo: Path, capsys: pytest.CaptureFixture) -> None:
    b = Builder()
    first = cached_dir("gate", b, config={"steps": 2}, code=CODE, root=repo)
    (repo / "README.md").write_text("docs changed")  # not matched by the code globs: same key
    assert cached_dir("gate", b, config={"steps": 2}, code=CODE, root=repo) == first and b.calls == 1
    (repo / "pkg" / "sub" / "train.py").write_text("LR = 2e-4\n")  # a nested file, matched by **
    capsys.readouterr()
    second = cached_dir("gate", b, config={"steps": 2}, code=CODE, root=repo)
    assert second != first and b.calls == 2
    assert "fixture gate: building (code or config changed)" in capsys.readouterr().err
    (repo / "configs" / "sft" / "new.yaml").write_text("steps: 3\n")  # a new file under a directory glob
    assert cached_dir("gate", b, config={"steps": 2}, code=CODE, root=repo) != second and b.calls == 3
    (repo / "pins.txt").write_text("torch==2.16.0\n")
    assert cached_dir("gate", b, config={"steps": 2}, code=CODE, root=repo) and b.calls == 4


def test_config_change_invalidates(repo: Path) -> None:
    b = Builder()
    a = cached_dir("flow", b, config={"steps": 2, "lr": 1e-4}, code=CODE, root=repo)
    # key order is not a change
    assert cached_dir("flow", b, config={"lr": 1e-4, "steps": 2}, code=CODE, root=repo) == a
    assert cached_dir("flow", b, config={"steps": 3, "lr": 1e-4}, code=CODE, root=repo) != a and b.calls == 2
    assert cache_key({"steps": 2}, CODE, repo) != cache_key({"steps": 2}, CODE[:1], repo)
    with pytest.raises(TypeError, match="plain JSON"):
        cache_key({"path": object()}, CODE, repo)


def test_half_built_entry_is_never_used(repo: Path) -> None:
    def dies(out: Path) -> None:
        (out / "model.txt").write_text("half")
        raise KeyboardInterrupt  # as a run stopped by Ctrl-C mid-training

    with pytest.raises(KeyboardInterrupt):
        cached_dir("gate", dies, config={"steps": 2}, code=CODE, root=repo)
    cache = repo.parent / "cache"
    assert not [p for p in cache.iterdir() if p.name.startswith(("gate-", ".tmp-gate-"))], "a failed build left files"
    # a directory at the entry's path that this module never published (no marker: a crash, a manual copy)
    key = cache_key({"steps": 2}, CODE, repo)
    (cache / f"gate-{key}").mkdir()
    (cache / f"gate-{key}" / "model.txt").write_text("half")
    b = Builder()
    entry = cached_dir("gate", b, config={"steps": 2}, code=CODE, root=repo)
    assert b.calls == 1 and (entry / "model.txt").read_text() == "build 1"
    with pytest.raises(ValueError, match="plain non-empty file name"):
        cached_dir("../gate", b, config={}, code=CODE, root=repo)


def test_two_concurrent_builders_build_once(repo: Path) -> None:
    """Two processes (as two pytest-xdist workers) ask for the same key at the same moment."""
    script = textwrap.dedent(
        """
        import os, sys, time
        from pathlib import Path
        from tests.fixture_cache import cached_dir
        repo, go = Path(sys.argv[1]), Path(sys.argv[2])
        def build(out):
            with open(repo / "builds.txt", "a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(1.5)  # long enough that the other process arrives while this one builds
            (out / "model.txt").write_text("built")
        while not go.exists():
            time.sleep(0.01)
        print(cached_dir("judge", build, config={"steps": 2}, code=("pkg/**/*.py",), root=repo))
        """
    )
    go = repo / "go"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(repo), str(go)], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    go.touch()
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and (Path(outs[0]) / "model.txt").read_text() == "built"
    assert len((repo / "builds.txt").read_text().split()) == 1, "both processes built the fixture"


def test_stale_keys_their_locks_and_abandoned_builds_are_pruned(repo: Path) -> None:
    """After a build: another key unused for over an hour goes, with its lock file; a temporary directory from a
    build killed over a day ago goes; a fresh one (a build in progress elsewhere) and a live entry's lock stay."""
    import time

    from tests.fixture_cache import cache_root

    base = cache_root()
    first = cached_dir("m", Builder(), config={"v": 1}, code=CODE, root=repo)
    old_lock = base / f".{first.name}.lock"
    assert old_lock.exists()
    long_ago = time.time() - 2 * 86_400
    os.utime(first / MARKER, (long_ago, long_ago))
    os.utime(old_lock, (long_ago, long_ago))
    dead, live = base / ".tmp-m-0123456789abcdef-deadbeef", base / ".tmp-m-fedcba9876543210-0badf00d"
    dead.mkdir()
    live.mkdir()
    os.utime(dead, (long_ago, long_ago))
    second = cached_dir("m", Builder(), config={"v": 2}, code=CODE, root=repo)
    assert second.exists() and (base / f".{second.name}.lock").exists()
    assert not first.exists() and not old_lock.exists() and not dead.exists() and live.exists()
