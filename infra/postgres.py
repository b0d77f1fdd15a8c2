"""A local PostgreSQL for rehearsals and tests (issue 20), the way ``infra.kafka_local`` runs a broker.

    flywheel db start|stop|status [--json]

``start`` initialises a cluster once with Debian's PostgreSQL binaries (``/usr/lib/postgresql/<version>/bin``, the
``postgresql`` package), starts it on ``127.0.0.1:<db_port>`` (5433: Debian's own cluster keeps 5432) and creates
the databases ``flywheel`` (the app's), ``flywheel_mlflow`` and ``flywheel_prefect`` (MLflow's and Prefect's
servers use them when that URL is set); it prints the URL to set as ``FLYWHEEL_APP_DATABASE_URL``. The
cluster's superuser is ``flywheel`` with a random password (SCRAM), kept with the instance's record in
``<home>/postgres/instance.json`` (owner-readable only); only loopback connections are accepted.

PostgreSQL refuses to run as root. As root the server runs as the ``postgres`` system user, and its files live
where that user can reach them (``/var/tmp/flywheel-postgres/<hash of the home>``): a home under ``/root`` or a
private temporary directory is not reachable by another user. Otherwise they live in ``<home>/postgres/``. Either
way the record says where, and ``stop`` stops that cluster (``pg_ctl stop -m fast``).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from feedback.settings import Settings

PG_ROOT = Path("/usr/lib/postgresql")
DATABASE = "flywheel"
DATABASES = (DATABASE, "flywheel_mlflow", "flywheel_prefect")  # the app's, MLflow's and Prefect's
SUPERUSER = "flywheel"
SYSTEM_USER = "postgres"


class PostgresError(RuntimeError):
    """The instance could not start or answer; the message says why and what to do."""


@dataclass
class Instance:
    port: int
    base: str  # where its files live (data/, the log, the socket)
    password: str
    running: bool = False
    pid: int | None = None
    host: str = "127.0.0.1"  # the address it listens on (loopback, unless a rehearsal gives it a namespace's)
    netns: str | None = None  # the network namespace it runs in (``benchmarks.fleet --netns``)

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@{self.host}:{self.port}/{DATABASE}"

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("password")
        out["url"] = self.url.replace(self.password, "***")
        return out


def bin_dir() -> Path:
    """The newest installed PostgreSQL's binaries."""
    versions = sorted((p for p in PG_ROOT.glob("*/bin") if (p / "initdb").exists()), key=lambda p: int(p.parent.name))
    if not versions:
        raise PostgresError(
            "PostgreSQL is not installed: `apt-get install postgresql` (Debian's package gives initdb and pg_ctl)"
        )
    return versions[-1]


def record_path(settings: Settings) -> Path:
    return settings.home / "postgres" / "instance.json"


def _as_root() -> bool:
    return os.geteuid() == 0


def _base(settings: Settings) -> Path:
    if _as_root():
        digest = hashlib.sha256(str(settings.home.resolve()).encode()).hexdigest()[:16]
        return Path("/var/tmp/flywheel-postgres") / digest
    return (settings.home / "postgres").resolve()


def _run(cmd: list[str], timeout: float = 120, netns: str | None = None) -> subprocess.CompletedProcess:
    """A PostgreSQL tool, as the ``postgres`` user when we are root (inside ``netns`` when one is named)."""
    if _as_root():
        cmd = ["runuser", "-u", SYSTEM_USER, "--", *cmd]
    if netns:
        cmd = ["/usr/sbin/ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _load(settings: Settings) -> Instance | None:
    path = record_path(settings)
    return Instance(**json.loads(path.read_text())) if path.exists() else None


def _save(settings: Settings, inst: Instance) -> None:
    path = record_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    record = {"port": inst.port, "base": inst.base, "password": inst.password, "host": inst.host, "netns": inst.netns}
    tmp.write_text(json.dumps(record))
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def _pid(base: Path) -> int | None:
    try:
        pid = int((base / "data" / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def _initdb(base: Path, password: str) -> None:
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    if _as_root():
        shutil.chown(base, SYSTEM_USER, SYSTEM_USER)
    pwfile = base / "pw"
    pwfile.write_text(password + "\n")
    os.chmod(pwfile, 0o600)
    if _as_root():
        shutil.chown(pwfile, SYSTEM_USER, SYSTEM_USER)
    try:
        done = _run(
            [
                str(bin_dir() / "initdb"),
                "-D",
                str(base / "data"),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ]
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        raise PostgresError(f"initdb failed: {(done.stderr or done.stdout).strip()[-500:]}")


def start(
    settings: Settings,
    timeout_s: float = 60.0,
    host: str = "127.0.0.1",
    netns: str | None = None,
    allow: str | None = None,
) -> Instance:
    """Initialise once, start if not running, create the database; the instance (``running`` True).

    A new instance listens on ``host`` (loopback by default) inside ``netns`` (none by default), and accepts
    password connections from the ``allow`` subnet beside loopback (the fleet rehearsal's namespaces); these are
    kept in its record, so a restart keeps them."""
    inst = _load(settings)
    if inst is None:
        inst = Instance(
            port=settings.db_port, base=str(_base(settings)), password=secrets.token_urlsafe(24), host=host, netns=netns
        )
        if (Path(inst.base) / "data").exists():
            shutil.rmtree(inst.base)  # a cluster whose record was lost: its password is gone with it
        _initdb(Path(inst.base), inst.password)
        if allow:
            with open(Path(inst.base) / "data" / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {allow} scram-sha-256\n")
        _save(settings, inst)
    base = Path(inst.base)
    if _pid(base) is None:
        options = f"-p {inst.port} -c listen_addresses={inst.host} -k {base}"
        done = _run(
            [str(bin_dir() / "pg_ctl"), "-D", str(base / "data"), "-l", str(base / "postgres.log"), "-o", options]
            + ["-w", "-t", str(int(timeout_s)), "start"],
            timeout=timeout_s + 30,
            netns=inst.netns,
        )
        if done.returncode != 0:
            log = (base / "postgres.log").read_text(errors="replace")[-800:] if (base / "postgres.log").exists() else ""
            raise PostgresError(
                f"PostgreSQL did not start on port {inst.port} ({done.stderr.strip()[-300:]}); is the port taken? "
                f"Set FLYWHEEL_DB_PORT. Its log: {log}"
            )
    _ensure_database(inst)
    inst.running, inst.pid = True, _pid(base)
    return inst


def _ensure_database(inst: Instance) -> None:
    """The app's database and MLflow's and Prefect's beside it (``Settings.service_database_url``)."""
    import psycopg

    admin = inst.url.rsplit("/", 1)[0] + "/postgres"
    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(admin, autocommit=True, connect_timeout=5) as con:
                for name in DATABASES:
                    if con.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                        con.execute(f'CREATE DATABASE "{name}"')
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def stop(settings: Settings, timeout_s: float = 60.0) -> bool:
    """Stop the instance of this home; True when one was running."""
    inst = _load(settings)
    if inst is None or _pid(Path(inst.base)) is None:
        return False
    done = _run(
        [str(bin_dir() / "pg_ctl"), "-D", str(Path(inst.base) / "data"), "-m", "fast", "-w"]
        + ["-t", str(int(timeout_s)), "stop"],
        timeout=timeout_s + 30,
    )
    if done.returncode != 0:
        raise PostgresError(f"pg_ctl stop failed: {done.stderr.strip()[-300:]}")
    return True


def status(settings: Settings) -> Instance | None:
    """The instance of this home (``running`` and ``pid`` filled in), or None when none was ever started."""
    inst = _load(settings)
    if inst is not None:
        inst.pid = _pid(Path(inst.base))
        inst.running = inst.pid is not None
    return inst


def destroy(settings: Settings) -> None:
    """Stop the instance and remove its files and record (tests, rehearsals)."""
    inst = _load(settings)
    if inst is None:
        return
    stop(settings)
    shutil.rmtree(inst.base, ignore_errors=True)
    record_path(settings).unlink(missing_ok=True)
