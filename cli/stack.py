"""``flywheel up``: start every service, supervise them, and stop them all cleanly on Ctrl-C.

Order: Kafka broker (a daemon; stopped at the end only if this command started it), the ingest consumer,
the Prefect server and the flow runner, the chat app. A child that dies is restarted with backoff and the
event is printed; Ctrl-C (or SIGTERM) stops the children in reverse order with SIGTERM, then SIGKILL after 20 s.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from rich.console import Console

from feedback.settings import Settings

console = Console()


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    log_path: str = ""

    def start(self, s: Settings) -> None:
        logs = s.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = str(logs / f"{self.name}.log")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        console.print(f"[green]up[/green] {self.name} (pid {self.proc.pid}, log {self.log_path})")


def run_stack(s: Settings, app_server: bool = True, prefect: bool = True) -> int:
    from infra import kafka_local

    s.home.mkdir(parents=True, exist_ok=True)
    started_broker = not kafka_local.answering(s)
    try:
        st = kafka_local.start(s)
    except kafka_local.KafkaError as e:
        console.print(f"[red]kafka: {e}[/red]")
        return 1
    console.print(f"[green]up[/green] kafka {st.bootstrap} (pid {st.pid or 'external'})")

    py = sys.executable
    children = [Child("ingest", [py, "-m", "feedback.ingest"])]
    children.append(Child("mlflow", [py, "-m", "infra.mlflow_server"]))  # registry UI; marker once it answers
    if prefect:
        from infra import prefect_server

        prefect_server.start(s)
        console.print(f"[green]up[/green] prefect server http://{s.prefect_host}:{s.prefect_port}")
        children.append(Child("flows", [py, "-m", "pipelines.serve"]))
        children.append(Child("worker", [py, "-m", "pipelines.serve", "worker"]))  # runs `train` on flywheel-cpu
    if app_server:
        children.append(Child("app", [py, "-m", "app.server"]))

    stopping = False

    def _stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    for c in children:
        c.start(s)
    if app_server:
        console.print(f"[bold]chat:[/bold] http://{s.app_host}:{s.app_port}/   "
                      f"[bold]API:[/bold] http://{s.app_host}:{s.app_port}/v1   (Ctrl-C stops everything)")
    console.print(f"[bold]MLflow:[/bold] http://{s.mlflow_host}:{s.mlflow_port}/"
                  + (f"   [bold]Prefect:[/bold] http://{s.prefect_host}:{s.prefect_port}/" if prefect else ""))
    while not stopping:
        time.sleep(0.5)
        for c in children:
            if c.proc is not None and c.proc.poll() is not None and not stopping:
                code = c.proc.returncode
                c.proc = None
                c.restarts += 1
                delay = min(30.0, 2.0 ** min(c.restarts, 5))
                c.next_start = time.monotonic() + delay
                console.print(f"[red]{c.name} exited with {code}[/red]; restarting in {delay:.0f}s "
                              f"(see {c.log_path})")
            if c.proc is None and time.monotonic() >= c.next_start and not stopping:
                c.start(s)
    console.print("stopping ...")
    for c in reversed(children):
        if c.proc is not None and c.proc.poll() is None:
            c.proc.terminate()
    deadline = time.monotonic() + 20
    for c in reversed(children):
        if c.proc is None:
            continue
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.proc.kill()
        console.print(f"stopped {c.name}")
    if prefect:
        from infra import prefect_server

        prefect_server.stop(s)
        console.print("stopped prefect server")
    if started_broker:
        kafka_local.stop(s)
        console.print("stopped kafka")
    return 0
