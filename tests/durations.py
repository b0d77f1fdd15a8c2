"""The suite's time, from the last local runs (pytest's cache).

- ``python -m tests.durations``: merge the group durations of the last runs into ``tests/durations.json``, which
  a fresh clone uses to start the longest groups first (run it after a full ``make test``);
- ``python -m tests.durations --tests [N]``: print the N slowest tests (setup + call + teardown, default 40) and
  each group's share of the total: where the suite's time goes.
"""

from __future__ import annotations

import json
import sys

from tests.conftest import DURATIONS_FILE, DURATIONS_KEY, REPO, TESTS_KEY, group_of


def _cached(key: str) -> dict[str, float] | None:
    path = REPO / ".pytest_cache" / "v" / key
    if not path.exists():
        print(f"no durations in {path}: run `make test` first", file=sys.stderr)
        return None
    return json.loads(path.read_text())


def profile(n: int) -> int:
    tests = _cached(TESTS_KEY)
    if tests is None:
        return 1
    total = sum(tests.values())
    groups: dict[str, float] = {}
    for nodeid, s in tests.items():
        groups[group_of(nodeid)] = groups.get(group_of(nodeid), 0.0) + s
    print(f"{len(tests)} tests, {total:,.0f} s of test time in all (workers overlap: wall time is less)")
    print(f"\n{n} slowest tests:")
    for nodeid, s in sorted(tests.items(), key=lambda kv: -kv[1])[:n]:
        print(f"  {s:8.1f} s  {nodeid}")
    print("\ngroups:")
    for g, s in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {s:8.1f} s  {100 * s / total:5.1f}%  {g}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--tests"]:
        return profile(int(argv[1]) if len(argv) > 1 else 40)
    cached = _cached(DURATIONS_KEY)
    if cached is None:
        return 1
    # Merged into what the file knows: a partial run (`make test-fast`, one file) updates the groups it ran and
    # keeps the others' figures (replacing the file with it once dropped every slow group from the schedule).
    merged = json.loads(DURATIONS_FILE.read_text()) if DURATIONS_FILE.exists() else {}
    merged.update(cached)
    merged = {k: v for k, v in merged.items() if (REPO / k.split("::")[0]).exists() or not k.startswith("tests/")}
    seconds = {k: round(v) for k, v in sorted(merged.items(), key=lambda kv: -kv[1])}
    DURATIONS_FILE.write_text(json.dumps(seconds, indent=1) + "\n")
    print(
        f"{len(cached)} groups from the last runs merged: {len(seconds)} groups, {sum(seconds.values())} s in all "
        f"-> {DURATIONS_FILE.relative_to(REPO)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
