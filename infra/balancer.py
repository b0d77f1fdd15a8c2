"""A load balancer in front of app replicas: Debian's nginx, one address for browsers and API clients (issue 20).

    python -m infra.balancer --listen 127.0.0.1:7860 --upstream 127.0.0.1:7861 --upstream 127.0.0.1:7862

``flywheel up`` runs it when ``FLYWHEEL_APP_REPLICAS`` is above 1 (it listens on the app's port; the replicas take
the ports after it). The process writes its configuration under ``<home>/balancer/`` and becomes nginx (``exec``),
so the supervisor's signals reach nginx itself.

Routing:
- A browser user (the signed ``flywheel_uid`` cookie) stays on one replica: Gradio keeps a session's queue in the
  process that took it (consistent hashing on the cookie, so adding a replica moves few users). Requests without
  the cookie (API clients, a first visit) are spread over all replicas.
- A replica that refuses connections (dead, restarting) is skipped: the request goes to the next one, for POSTs
  too, since nothing was sent (``proxy_next_upstream error timeout``). A replica that dies after it took a request
  is not retried behind the client's back (the answer may be half-streamed, a rating half-recorded): the client
  sees the connection end, and its retry lands on a live replica, with the same session (state is shared).
- Streams pass through unbuffered (server-sent events), and a response names the replica that served it
  (``X-Flywheel-Replica``), for operators and the fleet rehearsal.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from feedback.settings import get_settings

NGINX = "/usr/sbin/nginx"
READ_TIMEOUT_S = 600  # a long answer streams for minutes on a busy CPU


def nginx_binary() -> str:
    path = shutil.which("nginx") or NGINX
    if not Path(path).exists():
        raise RuntimeError("nginx is not installed: run `make setup` (it installs Debian's nginx-light)")
    return path


def config(listen: str, upstreams: list[str], workdir: Path) -> str:
    """nginx's configuration: ``listen`` (host:port) in front of ``upstreams`` (host:port each)."""
    if not upstreams:
        raise ValueError("a balancer needs at least one upstream replica")
    servers = "\n".join(f"        server {u} max_fails=1 fail_timeout=3s;" for u in upstreams)
    temp = "\n".join(f"    {k}_temp_path {workdir / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""# written by infra/balancer.py: edit that, not this
worker_processes 1;
daemon off;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 2048; }}
http {{
    access_log off;
{temp}
    map $http_upgrade $connection_upgrade {{ default upgrade; "" ""; }}
    map $cookie_flywheel_uid $flywheel_route {{ "" $request_id; default $cookie_flywheel_uid; }}
    upstream flywheel_app {{
        hash $flywheel_route consistent;
{servers}
        keepalive 32;
    }}
    server {{
        listen {listen};
        client_max_body_size 16m;
        location / {{
            proxy_pass http://flywheel_app;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_buffering off;
            proxy_cache off;
            proxy_connect_timeout 2s;
            proxy_read_timeout {READ_TIMEOUT_S}s;
            proxy_send_timeout {READ_TIMEOUT_S}s;
            proxy_next_upstream error timeout;
            proxy_next_upstream_tries {len(upstreams)};
            add_header X-Flywheel-Replica $upstream_addr always;
        }}
    }}
}}
"""


def prepare(workdir: Path, listen: str, upstreams: list[str]) -> list[str]:
    """Write the configuration under ``workdir`` and return nginx's argv (foreground; checked with ``-t`` first by
    ``main``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(config(listen, upstreams, workdir))
    return [nginx_binary(), "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.balancer", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, help="host:port the balancer answers on")
    p.add_argument("--upstream", action="append", required=True, help="an app replica's host:port (repeat)")
    p.add_argument("--dir", type=Path, default=None, help="where its configuration lives (<home>/balancer)")
    args = p.parse_args(argv)
    workdir = (args.dir or get_settings().home / "balancer").resolve()
    cmd = prepare(workdir, args.listen, args.upstream)
    check = os.spawnv(os.P_WAIT, cmd[0], [*cmd, "-t", "-q"])
    if check != 0:
        print(f"balancer: nginx refused its configuration ({workdir / 'nginx.conf'}): see {workdir / 'error.log'}")
        return 2
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # nginx in this process: the supervisor's SIGTERM stops it (fast shutdown)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
