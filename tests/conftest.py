"""Shared fixtures: the real Apache Kafka broker the suite starts, and a fresh world per test.

- ``kafka_broker`` (session): one real KRaft broker on free ports, its data in a session tmp dir.
- ``settings``: per test, a fresh ``FLYWHEEL_HOME``, a unique topic prefix (fresh topics) and consumer group,
  topics created. ``settings_env(settings)`` gives the same world to a subprocess.
- ``own_broker``: a broker of the test's own, for tests that stop, kill or restart it.

Parallel runs (``make test``: pytest-xdist, ``--dist loadfile``): each worker has its own session broker on free
ports. Each test file goes to one worker whole (its module fixtures are built once and its tests keep their order);
files that share state go together (``SHARED_GROUPS``, by ``pytest_xdist_make_scheduler``). Groups start longest
first, by the durations the previous run recorded in pytest's cache (by their marks where none is recorded yet).
Every process checks at the end that nothing it started is still running (``_leaves_nothing_behind``), and the
trained fixtures that ``tests/fixture_cache.py`` built are listed.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import psutil
import pytest

from feedback.settings import Settings
from feedback.topics import ensure_topics
from infra import kafka_local
from infra.ports import free_port

REPO = Path(__file__).resolve().parents[1]

# Before torch loads libgomp, in every worker and every process a test starts: three workers training at once on
# 2 cores took 46 s a step each with OpenMP's spinning waits and 18 s with passive ones (cli/main.py says the same).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Fixtures that start a service or load the model. A test using one is an integration test whatever markers it
# was written with, so `make test-fast` (which deselects integration, browser and slow) really needs nothing.
SERVICE_FIXTURES = frozenset(
    {
        "kafka_broker",
        "settings",
        "own_broker",
        "model_backend",
        "tiny_backend",
        "live",
        "prefect_harness",
        "trained_home",
        "_model_present",  # tests/app/test_backends.py, test_llamacpp.py: the real model in-process, both engines
    }
)


# Files whose tests share session state and must run in one process, in this order (the deletion test at the end of
# test_release_gate.py retires the snapshot the recipe tests trained on, and checks their versions are tainted).
SHARED_GROUPS = {
    "tests/training/test_recipes.py": "training",
    "tests/training/test_release_gate.py": "training",
}
DURATIONS_KEY = "flywheel/group_seconds"  # pytest's cache: seconds each group took in the last run that ran it


def group_of(nodeid: str) -> str:
    """The unit of parallel work a test belongs to: its file, or its file's shared group."""
    path = nodeid.split("::", 1)[0]
    return SHARED_GROUPS.get(path, path)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)
    known = getattr(config, "workerinput", {}).get("flywheel_group_seconds")
    if known is not None:  # a parallel run: longest groups first (one worker's long group is the critical path)
        first: dict[str, int] = {}
        guess: dict[str, float] = {}
        for i, item in enumerate(items):
            group = group_of(item.nodeid)
            first.setdefault(group, i)
            guess[group] = guess.get(group, 0.0) + guess_seconds(item)
        seconds = {g: known.get(g, guess[g]) for g in first}
        items.sort(key=lambda it: (-seconds[group_of(it.nodeid)], first[group_of(it.nodeid)]))


def guess_seconds(item: pytest.Item) -> float:
    """A test's duration before any run has recorded one (a fresh clone, CI): by its marks, roughly."""
    for mark, seconds in (("slow", 60.0), ("browser", 30.0), ("integration", 5.0)):
        if item.get_closest_marker(mark):
            return seconds
    return 0.1


# Seconds per group from a full run on the reference machine (2 cores), committed so that a fresh clone (CI) also
# starts the longest groups first; the last local run's figures in pytest's cache take precedence.
# Refresh: python -m tests.durations (it copies the cache's figures here).
DURATIONS_FILE = REPO / "tests" / "durations.json"


def known_group_seconds(config) -> dict[str, float]:
    import json

    known: dict[str, float] = {}
    if DURATIONS_FILE.exists():
        known.update(json.loads(DURATIONS_FILE.read_text()))
    cache = getattr(config, "cache", None)
    known.update((cache.get(DURATIONS_KEY, {}) if cache else {}) or {})
    return known


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: every worker gets the controller's view of the durations
def pytest_configure_node(node) -> None:
    node.workerinput["flywheel_group_seconds"] = known_group_seconds(node.config)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with ``SHARED_GROUPS``: a file (or a group of files) goes to one worker whole, groups in
    the order the workers collected them (longest first). xdist's own ``loadgroup`` cannot do this with pytest 9.2:
    it renames node ids to carry the group, and pytest 9 no longer lets it."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileGroupScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    config.option.loadscopereorder = False  # keep the collection order: longest groups first
    return FileGroupScheduling(config, log)


_GROUP_SECONDS: dict[str, float] = {}  # this run's seconds per group (setup + call + teardown of its tests)
_TEST_SECONDS: dict[str, float] = {}  # and per test: the profile `python -m tests.durations --tests` prints
TESTS_KEY = "flywheel/test_seconds"


def pytest_configure(config) -> None:
    config._flywheel_started = time.time()
    # every process this session starts inherits the mark, so one still running at the end is found by it
    os.environ["FLYWHEEL_TEST_SESSION"] = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


def pytest_runtest_logreport(report) -> None:
    group = group_of(report.nodeid)
    _GROUP_SECONDS[group] = _GROUP_SECONDS.get(group, 0.0) + report.duration
    _TEST_SECONDS[report.nodeid] = _TEST_SECONDS.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus) -> None:
    config = session.config
    if hasattr(config, "workerinput") or not _GROUP_SECONDS or getattr(config, "cache", None) is None:
        return  # workers report to the controller; the controller (or a plain run) records the durations
    known = dict(config.cache.get(DURATIONS_KEY, {}) or {})
    known.update({k: round(v, 1) for k, v in _GROUP_SECONDS.items()})
    config.cache.set(DURATIONS_KEY, known)
    tests = dict(config.cache.get(TESTS_KEY, {}) or {})
    tests.update({k: round(v, 2) for k, v in _TEST_SECONDS.items()})
    config.cache.set(TESTS_KEY, tests)


def pytest_terminal_summary(terminalreporter, config) -> None:
    """The trained fixtures built during this run (a cache miss: code or config changed), from every worker."""
    from tests.fixture_cache import LOG, cache_root

    log = cache_root() / LOG
    if hasattr(config, "workerinput") or not log.exists():
        return
    built = []
    for line in log.read_text().splitlines():
        stamp, _, text = line.partition(" ")
        try:
            if float(stamp) >= config._flywheel_started:
                built.append(text)
        except ValueError:
            continue
    if built:
        terminalreporter.section("trained fixtures built in this run (tests/fixture_cache.py)")
        for text in built:
            terminalreporter.write_line(text)


def _session_leftovers() -> tuple[list[psutil.Process], list[str]]:
    """Processes this session started that still run (its descendants, and any process carrying its
    ``FLYWHEEL_TEST_SESSION`` mark, which finds daemons whose parent already exited), and ports this process
    still listens on."""
    me = psutil.Process()
    mark = os.environ.get("FLYWHEEL_TEST_SESSION")
    found = {p.pid: p for p in me.children(recursive=True)}
    if mark:
        for p in psutil.process_iter():
            if p.pid == me.pid or p.pid in found:
                continue
            try:
                if p.environ().get("FLYWHEEL_TEST_SESSION") == mark:
                    found[p.pid] = p
            except (psutil.Error, OSError):
                continue
    procs = []
    for p in found.values():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                if p.ppid() == me.pid:
                    os.waitpid(p.pid, os.WNOHANG)  # reap a child that already exited
                continue
            if "multiprocessing.resource_tracker" in " ".join(p.cmdline()):  # exits with its parent
                continue
        except (psutil.Error, ChildProcessError):
            continue
        procs.append(p)
    ports = [f"{c.laddr.ip}:{c.laddr.port}" for c in me.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    return procs, ports


def _describe(p: psutil.Process) -> str:
    """Enough to find the test that started it: the command line and when it started."""
    try:
        started = time.strftime("%H:%M:%S", time.localtime(p.create_time()))
        return f"pid {p.pid} started {started}: {' '.join(p.cmdline())[:160]}"
    except psutil.Error:
        return f"pid {p.pid} (gone)"


@pytest.fixture(scope="session", autouse=True)
def _leaves_nothing_behind():
    """Set up first, so torn down last: after every other session fixture (brokers, Prefect, models) has stopped
    what it started, nothing this session started may still run or listen. Leftovers are listed, killed, and
    fail the run (a test or fixture that does not clean up is a bug: the next run would find its ports taken)."""
    yield
    deadline = time.monotonic() + 20  # a stopped service may take a moment to exit
    procs, ports = _session_leftovers()
    while (procs or ports) and time.monotonic() < deadline:
        time.sleep(0.5)
        procs, ports = _session_leftovers()
    if not procs and not ports:
        return
    listed = [_describe(p) for p in procs]
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)
    pytest.fail(
        "this test session left processes or ports behind (killed now; the test that started one did not stop it, "
        "see when it started): " + "; ".join(listed + [f"port {x} still listening in the test process" for x in ports]),
        pytrace=False,
    )


def need_model(path: Path) -> Path:
    """The real model must be there: a missing model fails the test (CI must never skip it)."""
    if not (path / "config.json").exists():
        pytest.fail(f"the base model is missing at {path}: run `make setup` (infra/prepare_model.py)")
    return path


def settings_env(s: Settings) -> dict[str, str]:
    """Environment for a subprocess that must see the same world as ``s``."""
    env = dict(os.environ)
    env.update(
        {
            "FLYWHEEL_HOME": str(s.home),
            "FLYWHEEL_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
            "FLYWHEEL_KAFKA_CONTROLLER_PORT": str(s.kafka_controller_port),
            "FLYWHEEL_TOPIC_PREFIX": s.topic_prefix,
            "FLYWHEEL_INGEST_GROUP": s.ingest_group,
            "FLYWHEEL_INGEST_BATCH_MS": str(s.ingest_batch_ms),
            "FLYWHEEL_INGEST_BATCH_MAX": str(s.ingest_batch_max),
            "FLYWHEEL_INGEST_SESSION_TIMEOUT_MS": str(s.ingest_session_timeout_ms),
            "FLYWHEEL_BASE_MODEL": str(s.base_model_path),
            "PYTHONPATH": str(REPO),
        }
    )
    return env


def _broker_settings(home: Path) -> Settings:
    return Settings(
        home=home, kafka_bootstrap=f"127.0.0.1:{free_port()}", kafka_controller_port=free_port(), kafka_heap="512m"
    )


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory) -> Settings:
    s = _broker_settings(tmp_path_factory.mktemp("broker"))
    kafka_local.start(s, create_topics=False, quiet=True)
    yield s
    kafka_local.stop(s)


@pytest.fixture
def settings(kafka_broker: Settings, tmp_path: Path) -> Settings:
    tag = uuid.uuid4().hex[:10]
    s = Settings(
        home=tmp_path / "home",
        kafka_bootstrap=kafka_broker.kafka_bootstrap,
        kafka_controller_port=kafka_broker.kafka_controller_port,
        topic_prefix=f"t{tag}",
        ingest_group=f"ingest-{tag}",
        ingest_batch_ms=100,
        ingest_session_timeout_ms=6_000,
        base_model=str(REPO / ".flywheel" / "models" / "base")
        if not os.environ.get("FLYWHEEL_BASE_MODEL")
        else os.environ["FLYWHEEL_BASE_MODEL"],
    )
    s.home.mkdir(parents=True)
    ensure_topics(s)
    return s


@pytest.fixture
def own_broker(tmp_path: Path) -> Settings:
    """A broker only this test uses (it may stop or kill it); stopped at the end."""
    tag = uuid.uuid4().hex[:10]
    base = _broker_settings(tmp_path / "home")
    s = Settings(
        home=base.home,
        kafka_bootstrap=base.kafka_bootstrap,
        kafka_controller_port=base.kafka_controller_port,
        kafka_heap="512m",
        ingest_group=f"ingest-{tag}",
        ingest_batch_ms=100,
        ingest_session_timeout_ms=6_000,
    )
    kafka_local.start(s, quiet=True)
    yield s
    kafka_local.stop(s, kill=True)
