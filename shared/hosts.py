"""Hosts of a sharded model (``[models.X] hosts = [...]``): which ones are this machine.

Rank 0 of a group always runs here (it talks to the gateway over an ``ipc://`` socket), so
``hosts[0]`` must be one of this machine's addresses; the other ranks on this machine are the
ones whose memory counts against this machine's budget.
"""

from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache

import psutil


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


@lru_cache(maxsize=1)
def _own_addresses() -> frozenset[str]:
    out = {"localhost", socket.gethostname()}
    try:
        for addrs in psutil.net_if_addrs().values():
            out.update(a.address.split("%")[0] for a in addrs
                       if a.family in (socket.AF_INET, socket.AF_INET6))
    except (OSError, psutil.Error):  # pragma: no cover - no interface table
        pass
    return frozenset(out)


def is_local_host(host: str) -> bool:
    """A loopback address, ``localhost``, this machine's name or one of its interface addresses."""
    if is_ip(host) and ipaddress.ip_address(host).is_loopback:
        return True
    return host in _own_addresses()


def local_ranks(hosts: list[str]) -> int:
    """How many ranks of a group run on this machine (1 for an ordinary worker)."""
    return sum(1 for h in hosts if is_local_host(h)) if hosts else 1
