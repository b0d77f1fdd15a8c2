"""Ending a child process: SIGTERM, a grace period, then SIGKILL; always reaped, so no zombie or port is left."""

from __future__ import annotations

import subprocess


def end(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """Stop ``proc`` (if it still runs): terminate, wait up to ``grace_s``, then kill and wait for it."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
