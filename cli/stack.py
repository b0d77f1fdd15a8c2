"""``flywheel up``: start every service, supervise them, and stop them all cleanly on Ctrl-C; ``flywheel down``:
stop whatever a killed ``flywheel up`` left behind.

Order: Kafka broker (a daemon; stopped at the end only if this command started it), the ingest consumer, the
MLflow server, the Prefect server, the flow runner and the training worker, the release autopilot
(``pipelines.autopilot``: gate-passed candidates to canary, then full or rollback), the chat app. A child that
dies is restarted with backoff and the event is printed.

Stopping within ``STOP_BUDGET_S`` (10 s): on Ctrl-C or SIGTERM every child and the Prefect server get SIGTERM
at the same time (the signal reaches each one's whole process tree), whatever is still alive after
``CHILD_GRACE_S`` gets SIGKILL; the broker's clean shutdown starts 2 s in, alongside, with SIGKILL after
``KAFKA_STOP_S`` (its log recovers on restart; producers keep unacknowledged events in their outbox, so nothing
is lost). Ctrl-C while the stack is still starting stops what was started the same way.

Every process is recorded in ``$FLYWHEEL_HOME/run/<name>.pid`` as ``<pid> <create_time>`` (so a recycled pid
is never signalled), the supervisor itself as ``up.pid``. ``flywheel down`` asks a live supervisor to stop, then
stops every recorded process still alive, the Prefect server and the broker(s), within the same budget.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from rich.console import Console

from feedback.settings import Settings

console = Console()
STOP_BUDGET_S = 10.0
CHILD_GRACE_S = 5.0
KAFKA_STOP_S = 5.5  # from 2 s in: a clean broker shutdown, else SIGKILL by 7.5 s (its log recovers on restart)
PREFECT_START_S = 300.0  # its first start migrates a database: minutes on a busy 2-core machine


# ---- pid files ------------------------------------------------------------------------------------------
def run_dir(s: Settings) -> Path:
    d = s.home / "run"
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_pid(s: Settings, name: str, pid: int) -> None:
    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:
        return
    (run_dir(s) / f"{name}.pid").write_text(f"{pid} {created}")


def recorded(s: Settings, name: str) -> psutil.Process | None:
    """The live process recorded under ``name`` (None if gone, or if its pid now belongs to someone else)."""
    path = run_dir(s) / f"{name}.pid"
    try:
        pid_s, created_s = path.read_text().split()
        proc = psutil.Process(int(pid_s))
        if abs(proc.create_time() - float(created_s)) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE:
            raise psutil.NoSuchProcess(int(pid_s))
        return proc
    except (FileNotFoundError, ValueError, psutil.Error):
        path.unlink(missing_ok=True)
        return None


def _signal_tree(proc: psutil.Process, sig: int) -> None:
    """Signal a process and everything it started (its children may have left its group)."""
    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        family = [proc]
    for p in family:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def stop_processes(
    procs: dict[str, psutil.Process],
    grace_s: float,
    then: Callable[[], object] | None = None,
    then_after_s: float = 2.0,
) -> dict[str, str]:
    """SIGTERM all at once, SIGKILL what is left after ``grace_s``; ``then`` (e.g. stopping the broker) starts
    after ``then_after_s`` (or as soon as all are gone) and runs alongside. Returns name -> 'stopped' | 'killed'."""
    t0 = time.monotonic()
    for p in procs.values():
        _signal_tree(p, signal.SIGTERM)
    _, alive = psutil.wait_procs(list(procs.values()), timeout=min(then_after_s, grace_s))
    worker = threading.Thread(target=then, name="stop-then") if then is not None else None
    if worker is not None:
        worker.start()
    _, alive = psutil.wait_procs(alive, timeout=max(0.0, grace_s - (time.monotonic() - t0)))
    out = {name: "stopped" for name in procs}
    for name, p in procs.items():
        if p in alive:
            _signal_tree(p, signal.SIGKILL)
            out[name] = "killed"
    psutil.wait_procs(alive, timeout=2)
    if worker is not None:
        worker.join()
    return out


# ---- flywheel up ----------------------------------------------------------------------------------------
@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    log_path: str = ""

    def start(self, s: Settings) -> None:
        logs = s.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = str(logs / f"{self.name}.log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self.env,
            )
        write_pid(s, self.name, self.proc.pid)
        console.print(f"[green]up[/green] {self.name} (pid {self.proc.pid}, log {self.log_path})")


def app_children(s: Settings, env: dict[str, str]) -> list[Child]:
    """The chat app: one process on ``app_port``; with ``app_replicas`` above 1, that many replicas on the ports
    after it behind the balancer (Debian's nginx, ``infra.balancer``) on ``app_port``. With ``serving=servers``,
    the model servers' manager (``app.model_servers``) comes first: the replicas stream from its servers."""
    py = sys.executable
    servers = [Child("model-servers", [py, "-m", "app.model_servers"], env)] if s.serving == "servers" else []
    if s.app_replicas == 1:
        return [*servers, Child("app", [py, "-m", "app.server"], env)]
    ports = [s.app_port + 1 + i for i in range(s.app_replicas)]
    replicas = [
        Child(f"app-{i}", [py, "-m", "app.server"], {**env, "FLYWHEEL_APP_PORT": str(port)})
        for i, port in enumerate(ports)
    ]
    upstreams = [arg for port in ports for arg in ("--upstream", f"{s.app_host}:{port}")]
    listen = f"{s.app_host}:{s.app_port}"
    return [*servers, *replicas, Child("balancer", [py, "-m", "infra.balancer", "--listen", listen, *upstreams], env)]


def run_stack(s: Settings, app_server: bool = True, prefect: bool = True, vllm: bool = False) -> int:
    from infra import kafka_local

    s.home.mkdir(parents=True, exist_ok=True)
    write_pid(s, "up", psutil.Process().pid)
    n = s.kafka_local_brokers
    env = dict(os.environ)
    if n > 1:  # every child talks to the whole cluster (bootstrap list, RF 3, min ISR 2)
        s = kafka_local.cluster_settings(s, kafka_local.cluster_nodes(s, None if _has_cluster(s) else n))
        env.update(
            {
                "FLYWHEEL_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
                "FLYWHEEL_KAFKA_REPLICATION": str(s.kafka_replication),
                "FLYWHEEL_KAFKA_MIN_INSYNC": str(s.kafka_min_insync),
            }
        )
    started_broker = not kafka_local.answering(s)
    py = sys.executable
    children: list[Child] = []
    stopping = threading.Event()
    # While starting, Ctrl-C/SIGTERM interrupts whatever waits (a broker or Prefect coming up can take minutes).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        # First start in about the time the app takes to load the model: the Prefect server (which migrates its
        # database on a first start) launches first, MLflow and the app (its events wait in the outbox) start
        # beside the broker, and what needs the broker or Prefect follows each.
        if prefect:
            from infra import prefect_server

            prefect_launched = prefect_server.launch(s)
        children.append(Child("mlflow", [py, "-m", "infra.mlflow_server"], env))  # registry UI; marker once it answers
        if app_server:
            children.extend(app_children(s, env))
        for c in children:
            c.start(s)
        st = kafka_local.start(s) if n == 1 else kafka_local.start_cluster(s, n)
        console.print(f"[green]up[/green] kafka {st.bootstrap} (pid {st.pid or 'external'})")
        later = [Child("ingest", [py, "-m", "feedback.ingest"], env)]
        if prefect:
            prefect_server.wait_healthy(s, prefect_launched, timeout_s=PREFECT_START_S)
            console.print(f"[green]up[/green] prefect server http://{s.prefect_host}:{s.prefect_port}")
            later.append(Child("flows", [py, "-m", "pipelines.serve"], env))
            later.append(Child("worker", [py, "-m", "pipelines.serve", "worker"], env))  # `train` runs here
        # Releases gate-passed candidates (canary -> full or rollback) by itself; resumes from the release log.
        later.append(Child("autopilot", [py, "-m", "pipelines.autopilot", "--wait-for-mlflow", "300"], env))
        if vllm:  # the GPU path: vLLM serves the base version, the app reaches it through backends.yaml
            from app.backends.vllm import stack_child_argv

            later.append(Child("vllm", stack_child_argv(s), env))
        for c in later:
            children.append(c)
            c.start(s)
    except (Exception, KeyboardInterrupt) as e:  # a failed or interrupted start leaves nothing running
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else f"failed: {e}"
        console.print(f"[red]start-up {why}[/red]; stopping what was started")
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_stack(s, children, prefect=prefect, broker=started_broker)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    if app_server:
        console.print(
            f"[bold]chat:[/bold] http://{s.app_host}:{s.app_port}/   "
            f"[bold]API:[/bold] http://{s.app_host}:{s.app_port}/v1   (Ctrl-C stops everything)"
        )
    console.print(
        f"[bold]MLflow:[/bold] http://{s.mlflow_host}:{s.mlflow_port}/"
        + (f"   [bold]Prefect:[/bold] http://{s.prefect_host}:{s.prefect_port}/" if prefect else "")
    )
    while not stopping.wait(0.5):
        for c in children:
            _supervise(s, c, stopping)
    stop_stack(s, children, prefect=prefect, broker=started_broker)
    return 0


def exit_now(code: int) -> None:
    """Leave at once once everything is stopped: the interpreter's own teardown of the big module graph takes
    seconds on a busy machine, and it would count against the stop budget."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _has_cluster(s: Settings) -> bool:
    from infra import kafka_local

    return (kafka_local.cluster_dir(s) / "cluster.json").exists()


def _supervise(s: Settings, c: Child, stopping: threading.Event) -> None:
    if c.proc is not None and c.proc.poll() is not None and not stopping.is_set():
        code = c.proc.returncode
        c.proc = None
        c.restarts += 1
        delay = min(30.0, 2.0 ** min(c.restarts, 5))
        c.next_start = time.monotonic() + delay
        console.print(f"[red]{c.name} exited with {code}[/red]; restarting in {delay:.0f}s (see {c.log_path})")
    if c.proc is None and time.monotonic() >= c.next_start and not stopping.is_set():
        c.start(s)


def stop_stack(s: Settings, children: list[Child], prefect: bool, broker: bool) -> dict[str, str]:
    """Everything down within ``STOP_BUDGET_S``: children and Prefect together, then the broker."""
    from infra import kafka_local

    t0 = time.monotonic()
    console.print("stopping ...")
    procs = {c.name: psutil.Process(c.proc.pid) for c in children if c.proc is not None and c.proc.poll() is None}
    if prefect and (p := _prefect_proc(s)) is not None:
        procs["prefect server"] = p
    # The broker's clean shutdown starts 2 s in, alongside the last children: nothing depends on it by then
    # (an outbox that could not flush keeps its events for the next start), and it gets SIGKILL by the budget.
    stopped_kafka: list[str] = []
    then = (lambda: stopped_kafka.extend(kafka_local.stop_all(s, timeout_s=KAFKA_STOP_S))) if broker else None
    result = stop_processes(procs, CHILD_GRACE_S, then=then)
    for c in children:
        if c.proc is not None:
            c.proc.poll()  # reap
        (run_dir(s) / f"{c.name}.pid").unlink(missing_ok=True)
    if prefect:
        from infra import prefect_server

        prefect_server.stop(s, timeout_s=0.5)  # already stopped above; clears its pid files
    for name in stopped_kafka:
        result[name] = "stopped"
    for name, how in result.items():
        console.print(f"{how} {name}")
    (run_dir(s) / "up.pid").unlink(missing_ok=True)
    console.print(f"all stopped in {time.monotonic() - t0:.1f}s")
    return result


def _prefect_proc(s: Settings) -> psutil.Process | None:
    from infra import prefect_server

    try:
        pid = int((prefect_server.prefect_dir(s) / "server.pid").read_text())
        return psutil.Process(pid)
    except (FileNotFoundError, ValueError, psutil.Error):
        return None


def _mlflow_proc(s: Settings) -> psutil.Process | None:
    from infra import mlflow_server

    marker = mlflow_server.read_marker(s)
    try:
        return psutil.Process(int(marker["pid"])) if marker else None
    except (ValueError, psutil.Error):
        return None


# ---- flywheel down --------------------------------------------------------------------------------------
def down(s: Settings) -> dict[str, str]:
    """Stop what a (possibly killed) ``flywheel up`` left: its supervisor, children, Prefect, the broker(s)."""
    from infra import kafka_local

    t0 = time.monotonic()
    out: dict[str, str] = {}
    sup = recorded(s, "up")
    if sup is not None and sup.pid != psutil.Process().pid:
        sup.send_signal(signal.SIGTERM)  # a live supervisor stops its own stack in order
        gone, _ = psutil.wait_procs([sup], timeout=STOP_BUDGET_S)
        out["up"] = "stopped" if gone else "still stopping"
    procs = {}
    for f in sorted(run_dir(s).glob("*.pid")):
        if f.stem != "up" and (p := recorded(s, f.stem)) is not None:
            procs[f.stem] = p
    if (p := _prefect_proc(s)) is not None:
        procs["prefect server"] = p
    if (m := _mlflow_proc(s)) is not None:  # its own session: outlives a SIGKILLed infra.mlflow_server runner
        procs["mlflow server"] = m
    out.update(stop_processes(procs, CHILD_GRACE_S))
    for f in run_dir(s).glob("*.pid"):
        if f.stem != "up":
            f.unlink(missing_ok=True)
    from infra import prefect_server

    prefect_server.stop(s, timeout_s=0.5)
    from infra import mlflow_server

    mlflow_server.stop(s, timeout_s=0.5)  # already stopped above; removes its server.json
    left = max(2.0, STOP_BUDGET_S - (time.monotonic() - t0))
    for name in kafka_local.stop_all(s, timeout_s=left):
        out[name] = "stopped"
    out["seconds"] = f"{time.monotonic() - t0:.1f}"
    return out
