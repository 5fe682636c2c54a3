"""Which host each rank of a group runs on: symmetric memory reaches only the GPUs of one node.

A rank's host is ``$ODYSSEUS_HOST`` if set (tests label forked CPU ranks with it to emulate several nodes;
a cluster whose hostnames do not tell nodes apart can set it too), else ``socket.gethostname()``.
"""

from __future__ import annotations

import os
import socket

import torch.distributed as dist

from .failures import named_failures
from .groups import group_size, meta_group

HOST_ENV = "ODYSSEUS_HOST"
_HOSTS: dict[str, list[str]] = {}


def host_name() -> str:
    """This rank's host: ``$ODYSSEUS_HOST``, else the hostname."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def group_hosts(pg) -> list[str]:
    """Every rank's :func:`host_name`, in group rank order, the same list on every rank.

    Collective over ``pg``'s gloo side group the first time; cached per group after that."""
    if group_size(pg) == 1:
        return [host_name()]
    if pg.group_name not in _HOSTS:
        hosts: list = [None] * group_size(pg)
        with named_failures("host names exchange"):
            dist.all_gather_object(hosts, host_name(), group=meta_group(pg))
        _HOSTS[pg.group_name] = hosts
    return _HOSTS[pg.group_name]


def spans_hosts(pg) -> bool:
    """Whether the ranks of ``pg`` run on more than one host (collective the first time, see :func:`group_hosts`)."""
    return len(set(group_hosts(pg))) > 1
