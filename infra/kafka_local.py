"""A real Apache Kafka broker for one machine: jars from Maven Central, KRaft mode, one combined node.

    flywheel kafka start|stop|status
    flywheel kafka start --brokers 3       # a local three-broker cluster: RF 3, min.insync.replicas=2

The jars are resolved once with Maven (``infra/kafka/pom.xml``) into ``infra/kafka/lib``. The broker's data
lives in ``$FLYWHEEL_HOME/kafka/data``, formatted once (cluster id kept in ``cluster.id``) and reused across
restarts, so topics and events survive. Listener ports come from ``FLYWHEEL_KAFKA_BOOTSTRAP`` (first entry)
and ``FLYWHEEL_KAFKA_CONTROLLER_PORT``.

A local cluster (``start_cluster``, the path operators take past one machine) runs N combined KRaft nodes on
this machine, each in ``$FLYWHEEL_HOME/kafka/cluster/node-<i>/`` with its own pid file: brokers on the bootstrap
port and the next ones (9092, 9093, 9094), or on the ports listed in ``FLYWHEEL_KAFKA_BOOTSTRAP`` when it names
N servers; controllers on the ports right after the highest broker port (9095 ...). Topics get replication factor 3 and
``min.insync.replicas=2``, as do Kafka's internal topics, so one broker can die without losing an acknowledged
event or refusing writes. ``stop_node``/``start_node`` take one node down and back (the fault campaign).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
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
        out = subprocess.run(
            [_java(), "-cp", _classpath(), "kafka.tools.StorageTool", "random-uuid"],
            capture_output=True,
            text=True,
            check=True,
        )
        cid_file.write_text(out.stdout.strip().splitlines()[-1])
    subprocess.run(
        [
            _java(),
            "-cp",
            _classpath(),
            f"-Dlog4j2.configurationFile={d / 'log4j2.properties'}",
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cid_file.read_text().strip(),
            "-c",
            str(config),
        ],
        check=True,
        capture_output=True,
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
        client = KafkaAdminClient(
            bootstrap_servers=s.bootstrap_servers, request_timeout_ms=int(timeout * 1000), client_id="flywheel-health"
        )
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
        bootstrap=s.kafka_bootstrap,
        pid=pid,
        process_alive=pid is not None,
        answering=answering(s),
        data_dir=str(s.kafka_dir / "data"),
        formatted=(s.kafka_dir / "data" / "meta.properties").exists(),
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
            [
                _java(),
                f"-Xmx{s.kafka_heap}",
                "-Xms128m",
                "-XX:+UseG1GC",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={s.kafka_dir / 'log4j2.properties'}",
                "-cp",
                _classpath(),
                "kafka.Kafka",
                str(config),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        (s.kafka_dir / "broker.pid").write_text(str(proc.pid))
        if not quiet:
            print(
                f"kafka: starting broker pid {proc.pid} on {s.kafka_bootstrap} (log {s.kafka_dir / 'broker.log'})",
                flush=True,
            )
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
    raise KafkaError(
        f"the broker did not answer on {s.kafka_bootstrap} within {wait_s:.0f}s; see {s.kafka_dir / 'broker.log'}"
    )


def stop(s: Settings, timeout_s: float = 30.0, kill: bool = False) -> bool:
    """Stop the broker (SIGTERM: a clean shutdown; ``kill=True``: SIGKILL). Returns False if none was running."""
    pid = _pid(s)
    if pid is None:
        return False
    _terminate(pid, timeout_s, kill)  # a broker that exits between two signals is not an error (it was one)
    (s.kafka_dir / "broker.pid").unlink(missing_ok=True)
    return True


# ---------------------------------------------------------------------------------------------------------
# A local multi-broker cluster (combined KRaft nodes, a static controller quorum)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    node_id: int
    host: str
    port: int
    controller_port: int
    dir: Path
    netns: str | None = None  # a network namespace to run in (the fleet rehearsal's own address per broker)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def cluster_dir(s: Settings) -> Path:
    return s.kafka_dir / "cluster"


def cluster_nodes(s: Settings, n: int | None = None) -> list[Node]:
    """The nodes of the local cluster: from ``cluster.json`` once started, else laid out from the settings."""
    layout = cluster_dir(s) / "cluster.json"
    if n is None and layout.exists():
        return [
            Node(d["node_id"], d["host"], d["port"], d["controller_port"], Path(d["dir"]), d.get("netns"))
            for d in json.loads(layout.read_text())
        ]
    n = n or 3
    servers = s.bootstrap_servers
    host, _, port0 = servers[0].rpartition(":")
    host = host or "127.0.0.1"
    ports = [int(x.rpartition(":")[2]) for x in servers] if len(servers) == n else [int(port0) + i for i in range(n)]
    controllers = [max(ports) + 1 + i for i in range(n)]
    return [Node(i + 1, host, ports[i], controllers[i], cluster_dir(s) / f"node-{i + 1}") for i in range(n)]


def cluster_settings(s: Settings, nodes: list[Node] | None = None) -> Settings:
    """The same settings pointed at the local cluster: every broker to bootstrap from, RF 3, min ISR 2."""
    nodes = nodes or cluster_nodes(s)
    return s.model_copy(
        update={
            "kafka_bootstrap": ",".join(n.address for n in nodes),
            "kafka_replication": min(3, len(nodes)),
            "kafka_min_insync": min(2, len(nodes)),
        }
    )


def _write_node_config(s: Settings, node: Node, nodes: list[Node]) -> Path:
    (node.dir / "data").mkdir(parents=True, exist_ok=True)
    rf, isr = str(min(3, len(nodes))), str(min(2, len(nodes)))
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.voters": ",".join(f"{n.node_id}@{n.host}:{n.controller_port}" for n in nodes),
        "listeners": f"PLAINTEXT://{node.host}:{node.port},CONTROLLER://{node.host}:{node.controller_port}",
        "advertised.listeners": f"PLAINTEXT://{node.host}:{node.port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str((node.dir / "data").resolve()),
        "num.partitions": str(s.kafka_partitions),
        "default.replication.factor": rf,
        "min.insync.replicas": isr,
        "auto.create.topics.enable": "false",
        "offsets.topic.replication.factor": rf,
        "transaction.state.log.replication.factor": rf,
        "transaction.state.log.min.isr": isr,
        "share.coordinator.state.topic.replication.factor": rf,
        "share.coordinator.state.topic.min.isr": isr,
        "group.initial.rebalance.delay.ms": "0",
        "message.max.bytes": str(max(2 * 1024 * 1024, s.max_event_bytes * 4)),
        "log.cleaner.min.compaction.lag.ms": "0",
        "controlled.shutdown.enable": "true",
    }
    path = node.dir / "server.properties"
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    (node.dir / "log4j2.properties").write_text(LOG4J)
    return path


def _node_pid(node: Node) -> int | None:
    try:
        pid = int((node.dir / "broker.pid").read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    except PermissionError:
        pass
    try:  # a zombie (our own dead child) is not running
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return None
    except ChildProcessError:
        pass
    return pid


def start_node(s: Settings, node: Node, nodes: list[Node], cluster_id: str) -> int:
    """Start one node (formatting its storage once); returns its pid. A running node is left alone."""
    pid = _node_pid(node)
    if pid is not None:
        return pid
    config = _write_node_config(s, node, nodes)
    if not (node.dir / "data" / "meta.properties").exists():
        subprocess.run(
            [
                _java(),
                "-cp",
                _classpath(),
                f"-Dlog4j2.configurationFile={node.dir / 'log4j2.properties'}",
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(config),
            ],
            check=True,
            capture_output=True,
        )
    with open(node.dir / "broker.log", "ab") as log:
        netns = ["/usr/sbin/ip", "netns", "exec", node.netns] if node.netns else []
        proc = subprocess.Popen(
            [
                *netns,
                _java(),
                f"-Xmx{s.kafka_heap}",
                "-Xms128m",
                "-XX:+UseG1GC",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={node.dir / 'log4j2.properties'}",
                "-cp",
                _classpath(),
                "kafka.Kafka",
                str(config),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (node.dir / "broker.pid").write_text(str(proc.pid))
    return proc.pid


def cluster_id(s: Settings) -> str:
    f = cluster_dir(s) / "cluster.id"
    if not f.exists():
        out = subprocess.run(
            [_java(), "-cp", _classpath(), "kafka.tools.StorageTool", "random-uuid"],
            capture_output=True,
            text=True,
            check=True,
        )
        f.write_text(out.stdout.strip().splitlines()[-1])
    return f.read_text().strip()


def start_cluster(
    s: Settings,
    brokers: int = 3,
    wait_s: float = 180.0,
    create_topics: bool = True,
    quiet: bool = False,
    nodes: list[Node] | None = None,
) -> BrokerStatus:
    """Start (or find running) a local cluster of ``brokers`` nodes and wait until every broker answers.
    ``nodes`` lays a new cluster out explicitly (hosts and namespaces of their own: ``benchmarks.fleet --netns``)."""
    from feedback.topics import ensure_topics

    layout = cluster_dir(s) / "cluster.json"
    if layout.exists():
        nodes = cluster_nodes(s)
    elif nodes is None:
        nodes = cluster_nodes(s, brokers)
    if len(nodes) != brokers:
        raise KafkaError(
            f"a {len(nodes)}-broker cluster already lives in {cluster_dir(s)}; stop it and remove "
            "that directory to change its size"
        )
    cluster_dir(s).mkdir(parents=True, exist_ok=True)
    layout.write_text(
        json.dumps(
            [
                {
                    "node_id": n.node_id,
                    "host": n.host,
                    "port": n.port,
                    "controller_port": n.controller_port,
                    "dir": str(n.dir),
                    "netns": n.netns,
                }
                for n in nodes
            ]
        )
    )
    cid = cluster_id(s)
    for node in nodes:
        pid = start_node(s, node, nodes, cid)
        if not quiet:
            print(
                f"kafka: broker {node.node_id} pid {pid} on {node.address} (log {node.dir / 'broker.log'})", flush=True
            )
    cs = cluster_settings(s, nodes)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if all(
            answering(cs.model_copy(update={"kafka_bootstrap": n.address}), timeout=1.0) for n in nodes
        ) and _brokers_registered(cs) >= len(nodes):
            if create_topics:
                ensure_topics(cs)
            return cluster_status(s)
        dead = [n for n in nodes if _node_pid(n) is None]
        if dead:
            tail = (dead[0].dir / "broker.log").read_text(errors="replace")[-2000:]
            raise KafkaError(f"broker {dead[0].node_id} exited during start-up; last log lines:\n{tail}")
        time.sleep(0.5)
    raise KafkaError(f"the cluster did not answer within {wait_s:.0f}s; see {cluster_dir(s)}/node-*/broker.log")


def _brokers_registered(s: Settings) -> int:
    from kafka import KafkaAdminClient

    try:
        client = KafkaAdminClient(
            bootstrap_servers=s.bootstrap_servers, request_timeout_ms=2000, client_id="flywheel-health"
        )
        try:
            return len(client.describe_cluster().get("brokers", []))
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - not ready yet
        return 0


def cluster_status(s: Settings) -> BrokerStatus:
    nodes = cluster_nodes(s)
    pids = [_node_pid(n) for n in nodes]
    cs = cluster_settings(s, nodes)
    return BrokerStatus(
        bootstrap=cs.kafka_bootstrap,
        pid=next((p for p in pids if p), None),
        process_alive=all(p is not None for p in pids),
        answering=answering(cs),
        data_dir=str(cluster_dir(s)),
        formatted=all((n.dir / "data" / "meta.properties").exists() for n in nodes),
    )


def stop_node(node: Node, timeout_s: float = 30.0, kill: bool = False) -> bool:
    pid = _node_pid(node)
    if pid is None:
        return False
    _terminate(pid, timeout_s, kill)
    (node.dir / "broker.pid").unlink(missing_ok=True)
    return True


def _terminate(pid: int, timeout_s: float, kill: bool) -> None:
    try:
        os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_cluster(s: Settings, timeout_s: float = 30.0, kill: bool = False) -> list[str]:
    """Stop every node of the local cluster at once (each shuts down cleanly; SIGKILL after ``timeout_s``)."""
    if not (cluster_dir(s) / "cluster.json").exists():
        return []
    nodes = [n for n in cluster_nodes(s) if _node_pid(n) is not None]
    threads = [threading.Thread(target=stop_node, args=(n, timeout_s, kill)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [f"kafka broker {n.node_id}" for n in nodes]


def stop_all(s: Settings, timeout_s: float = 30.0) -> list[str]:
    """Stop the single local broker and every cluster node, all at once. Returns what was stopped."""
    single: list[str] = []
    t = threading.Thread(target=lambda: single.append("kafka") if stop(s, timeout_s) else None)
    t.start()
    stopped = stop_cluster(s, timeout_s)
    t.join()
    return single + stopped
