"""Connecting to Ray: a cluster when `RAY_ADDRESS` names one, else a private local runtime."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
_progress = logging.getLogger("bertflow.progress")


def ensure_ray() -> None:
    """Initialise Ray once per process.

    With `RAY_ADDRESS` set (as `ray job submit` does), join that cluster. Otherwise start a
    private local runtime with more logical CPUs than cores: Ray Data and Ray Train otherwise
    wait on each other on small machines. `address="local"` keeps a stray `ray start` cluster
    on the same machine from being joined by accident.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        drop_stale_address_file()
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)


def drop_stale_address_file() -> None:
    """Remove Ray's "latest cluster" file when it names a dead head on this machine.

    `ray start` records its GCS address in `<ray temp dir>/ray_current_cluster` and `ray stop`
    removes it; a head that was killed leaves it behind. Ray Train's helper actors look the
    cluster up through that file even inside a private local runtime, and with a dead address
    every training run then waits ~12 s at its end on a connection timeout. Only a file whose
    host is an address of this machine and whose port refuses connections is removed.
    """
    import socket

    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:  # another Ray layout: leave the file alone
        return
    path = Path(get_ray_address_file(None))
    try:
        host, _, port = path.read_text().strip().rpartition(":")
        address = (host, int(port))
    except (OSError, ValueError):
        return
    try:
        with socket.socket() as probe:
            probe.bind((host, 0))  # fails unless `host` is an address of this machine
    except OSError:
        return
    try:
        with socket.create_connection(address, timeout=1.0):
            return  # a live head: not ours to touch
    except ConnectionRefusedError:
        pass
    except OSError:
        return
    with contextlib.suppress(OSError):
        path.unlink()
        log.warning("removed %s: it named a Ray head at %s:%s that is no longer running", path, host, port)


def worker_progress(message: str) -> None:
    """A progress line from inside a Ray Train worker, shown once on the driver's console.

    Ray Train routes a worker's `print` to its logger and, because Ray wraps the worker's
    stdout, to that stdout as well, so every printed line shows twice; a log record shows once
    (and lands in Ray Train's per-worker log file).
    """
    _progress.info(message)
