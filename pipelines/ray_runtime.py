"""Connecting to Ray: a cluster when `RAY_ADDRESS` names one, else a private local runtime."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from bert.errors import InputError

_progress = logging.getLogger("bertflow.progress")


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def ensure_ray(address: str | None = None, num_cpus: int | None = None, configure_logging: bool = True) -> None:
    """Initialise Ray once per process: join `address` (or `RAY_ADDRESS`'s cluster, as `ray job submit`
    sets it), else start a private local runtime with `num_cpus` logical CPUs (default: at least 4)."""
    import ray

    from pipelines import signals

    if ray.is_initialized():
        return
    try:
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address, configure_logging=configure_logging)
        else:
            check_room_for_ray()
            # workers import this project by path too, so an uninstalled checkout works
            paths = [str(PROJECT_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            start_local_ray(num_cpus, {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))},
                            configure_logging=configure_logging)
    except InputError:
        raise
    except Exception as exc:
        cause = ray_start_cause()
        if cause is None:
            raise
        raise InputError(f"Ray could not start: {cause}") from exc
    finally:
        signals.reinstall()  # ray.init replaces the SIGTERM handler (and Ray's C++ core dumps and aborts on it)


MIN_FREE_BYTES = 512 * 2**20  # Ray's session dir (logs, sockets) and object spilling need room in its temp root
MIN_FILE_SIZE_LIMIT = 2**30  # Ray's processes write logs and spill objects: a smaller `ulimit -f` kills them


def ray_start_cause() -> str | None:
    """Why a local Ray runtime cannot start here (a full disk, a small file-size limit), or None."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < MIN_FILE_SIZE_LIMIT:
        return (f"the file-size limit (ulimit -f) is {limit:,} bytes; Ray's processes write logs and spill objects "
                f"into {RAY_TEMP_ROOT} and need at least {MIN_FILE_SIZE_LIMIT:,}: raise the limit (ulimit -f unlimited)")
    root = RAY_TEMP_ROOT if RAY_TEMP_ROOT.is_dir() else Path(tempfile.gettempdir())
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return None
    if free < MIN_FREE_BYTES:
        return (f"no space left on {root} ({free / 2**20:.0f} MiB free; Ray needs at least "
                f"{MIN_FREE_BYTES // 2**20} MiB for its session logs and sockets): free some space")
    return None


def check_room_for_ray() -> None:
    """Refuse to start a local Ray runtime that would die at once (full disk, small file-size limit), naming why."""
    cause = ray_start_cause()
    if cause is not None:
        raise InputError(f"Ray cannot start: {cause}")


def start_local_ray(num_cpus: int | None = None, env_vars: dict[str, str] | None = None, **init_kwargs: Any) -> None:
    """A private local Ray runtime, with its dashboard, that Ray's own helpers can find.

    More logical CPUs than cores (at least 4): Ray Data and Ray Train otherwise wait on each
    other on small machines. `address="local"` keeps a stray `ray start` cluster on the same
    machine from being joined by accident. Ray Train's placement-group cleaner looks the
    cluster up by `RAY_ADDRESS` or by auto-detection, which in a local runtime finds a stale
    `ray start` address, or several runtimes, or (without the dashboard's state API) nothing:
    it then fails or waits ~12 s at the end of every training run. So the GCS gets a port
    chosen here and every worker gets `RAY_ADDRESS` naming it, and the dashboard runs.
    """
    import ray

    prune_ray_sessions()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    saved = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by ray.init when it starts the head's GCS
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus or max(4, os.cpu_count() or 1),
            include_dashboard=True,
            runtime_env={"env_vars": {**(env_vars or {}), "RAY_ADDRESS": f"127.0.0.1:{port}"}},
            **init_kwargs,
        )
    finally:
        if saved is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = saved


RAY_TEMP_ROOT = Path("/tmp/ray")  # Ray's default temp root: one session dir (logs, sockets) per runtime
STALE_SESSION_SECONDS = 600


def prune_ray_sessions(root: Path = RAY_TEMP_ROOT) -> list[Path]:
    """Remove the session dirs of local Ray runtimes that are gone (each run adds one, tens of MB of logs).

    A session is live while any process names its dir on its command line (Ray's raylet and GCS
    are started with `--session_dir`); a dir no process names, untouched for 10 minutes, belongs
    to a runtime that has exited. Failing to inspect or remove anything is never an error.
    """
    if not root.is_dir():
        return []
    try:
        live = set()
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                live.update(part for part in cmdline.split("\0") if "/session_" in part)
        removed = []
        for session in root.glob("session_2*"):
            if session.is_symlink() or any(str(session) in arg for arg in live):
                continue
            if time.time() - session.stat().st_mtime < STALE_SESSION_SECONDS:
                continue
            shutil.rmtree(session, ignore_errors=True)
            removed.append(session)
        return removed
    except OSError:
        return []


def worker_progress(message: str) -> None:
    """A progress line from inside a Ray Train worker, shown once on the driver's console.

    Ray Train routes a worker's `print` to its logger and, because Ray wraps the worker's
    stdout, to that stdout as well, so every printed line shows twice; a log record shows once
    (and lands in Ray Train's per-worker log file).
    """
    _progress.info(message)
