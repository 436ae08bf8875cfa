"""Connecting to Ray: a cluster when `RAY_ADDRESS` names one, else a private local runtime."""

from __future__ import annotations

import os


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
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)
