"""Where a group of processes meets: a TCPStore that one member hosts and the others join.

The host binds port 0 and only then publishes the port it got (a Ray return value, or a file in
the run directory that every node sees); nothing picks a "free" port in one process for another
process to bind later, which loses a race on a busy machine. Used by the worker gangs and the
weight-sync group (Ray), and by the ranks `srun` starts for the non-Ray stages (a file).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

RENDEZVOUS_FILE_ENV = "MEGARL_RENDEZVOUS_FILE"
"""Names the file where an srun job's rank 0 publishes its store (set by the launcher, one per launch)."""


@dataclass(frozen=True)
class Rendezvous:
    """A store one member hosts (`open_store`) and the others `connect` to (the sync group's is
    hosted by sender 0, trainer global rank 0; a worker gang's by its rank 0; an srun job's by rank 0)."""

    host: str
    port: int
    timeout_s: float = 600.0

    def connect(self) -> dist.TCPStore:
        return dist.TCPStore(self.host, self.port, is_master=False, timeout=timedelta(seconds=self.timeout_s),
                             use_libuv=True)


def open_store(host: str, port: int = 0, timeout_s: float = 600.0) -> tuple[dist.TCPStore, int]:
    """Host the rendezvous store (port 0: the one the kernel gives). Returns (store, bound port)."""
    store = dist.TCPStore(host, port, is_master=True, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False, use_libuv=True)
    return store, store.port


def publish_address(path: str, host: str, port: int) -> None:
    """Write (host, port) to `path` at once (a reader never sees half a file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"host": host, "port": port}, f)
    os.replace(tmp, path)


def wait_for_address(path: str, timeout_s: float, what: str = "the rendezvous") -> tuple[str, int]:
    """(host, port) once `publish_address` wrote `path`; TimeoutError naming the file after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} was not published in {path} within {timeout_s:.0f} s (is the run "
                               "directory on a file system every node shares? did the host process start?)")
        time.sleep(0.1)
    return read_address(path)


def read_address(path: str) -> tuple[str, int]:
    """(host, port) from a file `publish_address` wrote."""
    with open(path) as f:
        got = json.load(f)
    return got["host"], int(got["port"])
