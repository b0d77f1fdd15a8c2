"""Network namespaces on one machine, one per service, each with its own address (the fleet rehearsal, issue 20).

    net = Netns("fwr", ["lb", "app-0", "app-1", "ms-0"]).create()   # needs root (CAP_NET_ADMIN)
    net.addr("app-0")        # "10.213.0.3": the service listens there, and every other one reaches it there
    net.run_in("app-0")      # ["ip", "netns", "exec", "fwr-app-0"]: the prefix that starts a process inside it
    net.destroy()            # kills what still runs inside, deletes the namespaces and the bridge

Each namespace gets a veth pair whose outer end joins one bridge (``<tag>-br``) in the machine's own namespace; the
bridge holds the subnet's first address, so the rehearsal's driver (in the machine's namespace) reaches every service
and the services reach each other, all across the bridge as they would across a switch. Nothing is routed beyond
the subnet. Names carry the tag, so ``destroy`` (and ``cleanup(tag)`` after a run that was killed before it could
clean up) finds every piece by name alone.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import time

IP = "/usr/sbin/ip"


class NetnsError(RuntimeError):
    """A namespace could not be made; the message says why (usually: not root, or no CAP_NET_ADMIN)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()} (network namespaces need root)")
    return done


def namespaces(tag: str) -> list[str]:
    """The namespaces on this machine whose names start with ``<tag>-``."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].startswith(f"{tag}-")]


def pids_in(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def cleanup(tag: str, grace_s: float = 5.0) -> list[str]:
    """Kill every process inside the tag's namespaces (SIGTERM, then SIGKILL after ``grace_s``), delete them and
    the bridge. Safe to call when nothing is there; returns the namespaces it deleted."""
    found = namespaces(tag)
    pids = [p for ns in found for p in pids_in(ns)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.1)
        if not pids:
            break
    # The veths' outer ends are deleted here, not left to the namespaces' deletion: the kernel tears a deleted
    # namespace's interfaces down later, so a `create` right after would meet "File exists" (seen in the tests).
    for link in links(tag):
        _ip("link", "del", link, check=False)
    for ns in found:
        _ip("netns", "del", ns, check=False)
    deadline = time.monotonic() + 10
    while links(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def links(tag: str) -> list[str]:
    """The interfaces in the machine's namespace whose names start with ``<tag>-`` (the bridge, the veths' outer
    ends)."""
    out = _ip("-o", "link", "show", check=False).stdout
    names = [line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines() if line.count(":") >= 2]
    return [n for n in names if n.startswith(f"{tag}-")]


def _alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Netns:
    """Namespaces ``<tag>-<name>`` for ``names``, the ``n``-th at the subnet's address ``n + 1`` (the bridge has
    the first)."""

    def __init__(self, tag: str, names: list[str], subnet: str = "10.213.0.0/24"):
        if not tag.isalnum() or len(tag) > 6:
            raise ValueError("a namespace tag is 1-6 letters or digits (interface names are at most 15 characters)")
        if len(set(names)) != len(names):
            raise ValueError("namespace names must differ")
        self.tag = tag
        self.names = list(names)
        self.net = ipaddress.ip_network(subnet)
        hosts = list(self.net.hosts())
        if len(hosts) < len(names) + 1:
            raise ValueError(f"{subnet} has too few addresses for {len(names)} namespaces")
        self.bridge_addr = str(hosts[0])
        self._addr = {name: str(hosts[i + 1]) for i, name in enumerate(names)}

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def addr(self, name: str) -> str:
        return self._addr[name]

    def run_in(self, name: str) -> list[str]:
        """The argv prefix that runs a command inside ``name``'s namespace (``ip netns exec`` execs the command:
        the pid a caller gets is the command's own)."""
        return [IP, "netns", "exec", self.ns(name)]

    def pids(self, name: str) -> list[int]:
        return pids_in(self.ns(name))

    def create(self) -> Netns:
        """Make the bridge and every namespace (after cleaning up what an earlier run of this tag left)."""
        cleanup(self.tag)
        bridge, prefix = f"{self.tag}-br", self.net.prefixlen
        try:
            _ip("link", "add", bridge, "type", "bridge")
            _ip("addr", "add", f"{self.bridge_addr}/{prefix}", "dev", bridge)
            _ip("link", "set", bridge, "up")
            for i, name in enumerate(self.names):
                ns, outer, inner = self.ns(name), f"{self.tag}-v{i}", f"{self.tag}-i{i}"
                _ip("netns", "add", ns)
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                _ip("link", "set", inner, "netns", ns)
                _ip("link", "set", outer, "master", bridge)
                _ip("link", "set", outer, "up")
                _ip("-n", ns, "addr", "add", f"{self.addr(name)}/{prefix}", "dev", inner)
                _ip("-n", ns, "link", "set", inner, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            cleanup(self.tag)
            raise
        return self

    def destroy(self) -> list[str]:
        return cleanup(self.tag)

    def __enter__(self) -> Netns:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.destroy()
