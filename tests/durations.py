"""Copy the group durations of the last full local run (pytest's cache) into ``tests/durations.json``, which a
fresh clone uses to start the longest groups first: ``python -m tests.durations`` after a full ``make test``."""

from __future__ import annotations

import json
import sys

from tests.conftest import DURATIONS_FILE, DURATIONS_KEY, REPO


def main() -> int:
    cached = REPO / ".pytest_cache" / "v" / DURATIONS_KEY
    if not cached.exists():
        print(f"no durations in {cached}: run `make test` first", file=sys.stderr)
        return 1
    seconds = {k: round(v) for k, v in sorted(json.loads(cached.read_text()).items(), key=lambda kv: -kv[1])}
    DURATIONS_FILE.write_text(json.dumps(seconds, indent=1) + "\n")
    print(f"{len(seconds)} groups, {sum(seconds.values())} s in all -> {DURATIONS_FILE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
