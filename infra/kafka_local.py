"""A real Apache Kafka broker for one machine: jars from Maven Central, KRaft mode, one combined node.

    flywheel kafka start|stop|status

The jars are resolved once with Maven (``infra/kafka/pom.xml``) into ``infra/kafka/lib``. The broker's data
lives in ``$FLYWHEEL_HOME/kafka/data``, formatted once (cluster id kept in ``cluster.id``) and reused across
restarts, so topics and events survive. Listener ports come from ``FLYWHEEL_KAFKA_BOOTSTRAP`` (first entry)
and ``FLYWHEEL_KAFKA_CONTROLLER_PORT``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from feedback.settings import Settings

INFRA = Path(__file__).resolve().parent
POM = INFRA / "kafka" / "pom.xml"
LIB = INFRA / "kafka" / "lib"

LOG4J = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
"""


class KafkaError(RuntimeError):
    pass


@dataclass
class BrokerStatus:
    bootstrap: str
    pid: int | None
    process_alive: bool
    answering: bool
    data_dir: str
    formatted: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _host_port(s: Settings) -> tuple[str, int]:
    host, _, port = s.bootstrap_servers[0].rpartition(":")
    return host or "127.0.0.1", int(port)


def ensure_jars(quiet: bool = False) -> Path:
    """Resolve the broker's jars from Maven Central once (about 45 MB)."""
    if LIB.exists() and any(LIB.glob("kafka_2.13-*.jar")):
        return LIB
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaError("Maven (`mvn`) is needed to fetch Apache Kafka's jars: install it (apt-get install maven)")
    if not quiet:
        print("kafka: resolving Apache Kafka jars from Maven Central ...", flush=True)
    tmp = LIB.with_name("lib.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(
        [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies", f"-DoutputDirectory={tmp}"], check=True
    )
    tmp.rename(LIB)
    return LIB


def _java() -> str:
    java = shutil.which("java") or (Path(os.environ.get("JAVA_HOME", "/nonexistent")) / "bin" / "java").as_posix()
    if not Path(java).exists():
        raise KafkaError("Java 17+ is needed to run the broker: apt-get install -y openjdk-17-jre-headless")
    return java


def _classpath() -> str:
    return f"{ensure_jars()}/*"


def write_config(s: Settings) -> Path:
    host, port = _host_port(s)
    d = s.kafka_dir
    (d / "data").mkdir(parents=True, exist_ok=True)
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{host}:{s.kafka_controller_port}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{s.kafka_controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str((d / "data").resolve()),
        "num.partitions": str(s.kafka_partitions),
        "auto.create.topics.enable": "false",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "log.flush.interval.messages": "9223372036854775807",
        "message.max.bytes": str(max(2 * 1024 * 1024, s.max_event_bytes * 4)),
        "log.cleaner.min.compaction.lag.ms": "0",
    }
    path = d / "server.properties"
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    (d / "log4j2.properties").write_text(LOG4J)
    return path


def _format_once(s: Settings, config: Path) -> None:
    d = s.kafka_dir
    if (d / "data" / "meta.properties").exists():
        return
    cid_file = d / "cluster.id"
    if not cid_file.exists():
        out = subprocess.run([_java(), "-cp", _classpath(), "kafka.tools.StorageTool", "random-uuid"],
                             capture_output=True, text=True, check=True)
        cid_file.write_text(out.stdout.strip().splitlines()[-1])
    subprocess.run(
        [_java(), "-cp", _classpath(), f"-Dlog4j2.configurationFile={d / 'log4j2.properties'}",
         "kafka.tools.StorageTool", "format", "-t", cid_file.read_text().strip(), "-c", str(config)],
        check=True, capture_output=True,
    )


def _pid(s: Settings) -> int | None:
    try:
        pid = int((s.kafka_dir / "broker.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def answering(s: Settings, timeout: float = 2.0) -> bool:
    """True when the broker answers a metadata request (not just an open port)."""
    host, port = _host_port(s)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError:
        return False
    from kafka import KafkaAdminClient

    try:
        client = KafkaAdminClient(bootstrap_servers=s.bootstrap_servers, request_timeout_ms=int(timeout * 1000),
                                  client_id="flywheel-health")
        try:
            client.list_topics()
            return True
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "not healthy yet"
        return False


def status(s: Settings) -> BrokerStatus:
    pid = _pid(s)
    return BrokerStatus(
        bootstrap=s.kafka_bootstrap, pid=pid, process_alive=pid is not None, answering=answering(s),
        data_dir=str(s.kafka_dir / "data"), formatted=(s.kafka_dir / "data" / "meta.properties").exists(),
    )


def start(s: Settings, wait_s: float = 90.0, create_topics: bool = True, quiet: bool = False) -> BrokerStatus:
    """Start the local broker (or find it running) and wait until it answers. A second start is harmless."""
    from feedback.topics import ensure_topics

    if answering(s):
        if create_topics:
            ensure_topics(s)
        return status(s)
    if _pid(s) is None:
        config = write_config(s)
        _format_once(s, config)
        log = open(s.kafka_dir / "broker.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [_java(), f"-Xmx{s.kafka_heap}", "-Xms128m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
             f"-Dlog4j2.configurationFile={s.kafka_dir / 'log4j2.properties'}",
             "-cp", _classpath(), "kafka.Kafka", str(config)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        (s.kafka_dir / "broker.pid").write_text(str(proc.pid))
        if not quiet:
            print(f"kafka: starting broker pid {proc.pid} on {s.kafka_bootstrap} (log {s.kafka_dir / 'broker.log'})",
                  flush=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if answering(s, timeout=1.0):
            if create_topics:
                ensure_topics(s)
            return status(s)
        if _pid(s) is None:
            tail = (s.kafka_dir / "broker.log").read_text(errors="replace")[-2000:]
            raise KafkaError(f"the broker exited during start-up; last log lines:\n{tail}")
        time.sleep(0.3)
    raise KafkaError(f"the broker did not answer on {s.kafka_bootstrap} within {wait_s:.0f}s; "
                     f"see {s.kafka_dir / 'broker.log'}")


def stop(s: Settings, timeout_s: float = 30.0, kill: bool = False) -> bool:
    """Stop the broker (SIGTERM: a clean shutdown; ``kill=True``: SIGKILL). Returns False if none was running."""
    pid = _pid(s)
    if pid is None:
        return False
    os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        try:  # reap if it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
    (s.kafka_dir / "broker.pid").unlink(missing_ok=True)
    return True
