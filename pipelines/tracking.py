"""MLflow tracking for bertflow jobs.

The driver resolves the tracking URI, creates (or re-opens) the run and hands its id to the
workers; only rank 0 logs. Metrics go through `MetricLogger`, which batches them and sends
them from a background thread, so a slow or unreachable tracking server never stalls a
training step.

One rule for every job (`pretrain`, `finetune`, `sweep`, `run`): the tracking store is checked
before Ray starts and before anything is written (`check_tracking_store`). A store that cannot
be used — an unreachable server, a SQLite file that cannot be created or written, a SQLite store
left half-created or half-migrated — refuses the job with one line saying what to do; a job
never runs without tracking. A new SQLite store is created whole or not at all (built under a
temporary name, then linked into place), so a Ctrl-C during its creation leaves nothing behind.
A server that fails in the middle of a job turns logging off with one warning (the job goes on).

Default tracking store: SQLite under the job's output (or pipeline work) dir, since MLflow 3
deprecates the plain `./mlruns` file store. `MLFLOW_TRACKING_URI` overrides it. An output on an
object store cannot hold a SQLite database: its default store is a SQLite file in this machine's
cache (`storage.cache_dir("tracking", out)`), and the runs' artifacts go to the store, under
`<out>/mlartifacts/<experiment>` (MLflow's S3 client is boto3, which reads AWS_ENDPOINT_URL(_S3)
and the credentials from the environment itself; MLFLOW_S3_ENDPOINT_URL, if set, takes precedence).
A resume from another machine then opens a new run there: give a tracking server
(MLFLOW_TRACKING_URI) to keep one run per job across machines.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import queue
import sqlite3
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert import storage
from bert.errors import InputError

log = logging.getLogger(__name__)

_MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call
_MAX_PARAM_LENGTH = 6000


ARTIFACT_ROOT_FILE = "artifact_root.txt"  # beside the local SQLite store of an output on an object store


def default_tracking_uri(root: str | Path) -> str:
    """`MLFLOW_TRACKING_URI` if set, else a SQLite store `mlflow.db` under `root` (for a `root` on an object
    store: in this machine's cache, its artifacts under `<root>/mlartifacts`; see the module docstring)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if storage.is_remote(root):
        local = storage.cache_dir("tracking", root)
        local.mkdir(parents=True, exist_ok=True)
        (local / ARTIFACT_ROOT_FILE).write_text(str(storage.join(root, "mlartifacts")))
        return f"sqlite:///{local / 'mlflow.db'}"
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"  # the dir must exist before the store is opened


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live beside the database, not in the current directory (or on the object
    store, for the store `default_tracking_uri` keeps for an output there)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None  # a tracking server decides where artifacts go
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    remote = database.parent / ARTIFACT_ROOT_FILE
    if remote.is_file():
        return str(storage.join(remote.read_text().strip(), experiment))
    return (database.parent / "mlartifacts" / experiment).as_uri()


def check_reachable(uri: str, timeout: float = 5.0) -> str | None:
    """None if the tracking store answers, else a one-line reason."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - user-given tracking server
                if response.status != 200:
                    return f"{url} answered HTTP {response.status}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return f"cannot reach MLflow tracking server {uri}: {getattr(exc, 'reason', exc)}"
    return None


class TrackingStoreError(InputError):
    """The tracking store cannot be used; the message says why and what to do."""


SQLITE_PREFIX = "sqlite:///"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for other stores and in-memory databases)."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    path = uri.removeprefix(SQLITE_PREFIX).split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def check_tracking_store(uri: str, timeout: float = 5.0) -> None:
    """Refuse, naming why and what to do, a tracking store a job could not log into. Creates nothing.

    A server must answer its health check; a SQLite store must exist whole at MLflow's schema
    version and be writable, or be creatable (its nearest existing folder is a writable folder).
    Other stores (`postgresql://`, `databricks`, ...) are left to MLflow.
    """
    if uri.startswith(("http://", "https://")):
        reason = check_reachable(uri, timeout)
        if reason:
            raise TrackingStoreError(f"{reason}; start the server, or choose another --tracking-uri "
                                     "(nothing was created)")
        return
    path = sqlite_path(uri)
    if path is None:
        return
    if path.exists():
        _check_sqlite_store(path, uri)
        return
    folder = next(p for p in [path.parent, *path.parent.parents] if p.exists() or p == Path(p.anchor or "."))
    if not folder.is_dir():
        raise TrackingStoreError(f"cannot create the MLflow store {path}: {folder} is not a folder; choose another "
                                 "--tracking-uri (nothing was created)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TrackingStoreError(f"cannot create the MLflow store {path}: {folder} is not writable; choose another "
                                 "--tracking-uri (nothing was created)")


def _check_sqlite_store(path: Path, uri: str) -> None:
    """An existing SQLite store: a file, writable, an SQLite database at this MLflow's schema version."""
    if not path.is_file():
        raise TrackingStoreError(f"the MLflow store {path} is not a file; choose another --tracking-uri")
    if not (os.access(path, os.R_OK | os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)):
        raise TrackingStoreError(f"the MLflow store {path} (or its folder, for SQLite's journal) is not writable")
    if path.stat().st_size == 0:
        return  # an empty file: MLflow creates its tables in it
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = (db.execute("SELECT version_num FROM alembic_version").fetchone() or [None])[0] \
                if "alembic_version" in tables else None
            runs = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0
    except sqlite3.DatabaseError as exc:
        raise TrackingStoreError(f"the MLflow store {path} is not a readable SQLite database ({exc}); "
                                 "choose another --tracking-uri") from None
    head = mlflow_schema_head()
    if version == head or head is None:
        return
    if runs == 0:
        raise TrackingStoreError(
            f"the MLflow store {path} was left half-created (schema version {version or 'none'}, this MLflow "
            f"needs {head}; a run was stopped while creating it) and holds no runs: remove it (rm {path}) and "
            "re-run, and a complete store is created")
    raise TrackingStoreError(
        f"the MLflow store {path} holds {runs} run(s) at schema version {version or 'none'}, but this MLflow needs "
        f"{head} (a migration was stopped half-way, or another MLflow version wrote it): back it up, then run "
        f"`mlflow db upgrade {uri}`, or choose another --tracking-uri")


@functools.lru_cache(maxsize=1)
def mlflow_schema_head() -> str | None:
    """The newest schema revision of the installed MLflow, read from its migration scripts (no import)."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("mlflow")
    if spec is None or not spec.submodule_search_locations:
        return None
    versions = Path(next(iter(spec.submodule_search_locations))) / "store" / "db_migrations" / "versions"
    revisions, parents = set(), set()
    for script in versions.glob("*.py"):
        text = script.read_text(encoding="utf-8", errors="replace")
        revision = re.search(r'^revision\s*=\s*["\']([0-9a-f]+)["\']', text, re.MULTILINE)
        parent = re.search(r'^down_revision\s*=\s*["\']([0-9a-f]+)["\']', text, re.MULTILINE)
        if revision:
            revisions.add(revision.group(1))
        if parent:
            parents.add(parent.group(1))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def ensure_sqlite_store(uri: str) -> None:
    """Create the SQLite store of `uri` whole, if it does not exist: built under a temporary name, then linked
    into place (never over a store another run created meanwhile). A Ctrl-C while MLflow creates its tables
    (several seconds) leaves only the temporary, which the next run of the job removes."""
    path = sqlite_path(uri)
    if path is None or path.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        store = SqlAlchemyStore(f"{SQLITE_PREFIX}{tmp}", (path.parent / "mlartifacts").as_uri())
        store.engine.dispose()
        with contextlib.suppress(FileExistsError):  # another run created it meanwhile: keep theirs
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (`mlflow.start_run`, `mlflow.pyfunc.log_model`) at `uri` for one block.

    `mlflow.set_tracking_uri` is process-global and also exports `MLFLOW_TRACKING_URI`; left
    set, every later job in the process would log into this store. Both are restored on exit.
    """
    import mlflow

    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    saved = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; values rendered as strings and clipped to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, prefix=name + "."))
        else:
            out[name] = str(value)[:_MAX_PARAM_LENGTH]
    return out


@dataclass(frozen=True)
class RunHandle:
    """What a worker needs to log into a run the driver opened."""

    tracking_uri: str
    run_id: str


def ensure_experiment(client, tracking_uri: str, experiment: str) -> str:
    """The id of `experiment`, created (artifacts beside a SQLite store) if it does not exist."""
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(experiment, artifact_location=default_artifact_location(tracking_uri, experiment))


def open_run(
    tracking_uri: str,
    experiment: str,
    *,
    run_name: str,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> RunHandle | None:
    """Create a run (or re-open `run_id`, e.g. after a restart); a store that cannot be used is refused
    (`check_tracking_store`), never a run without tracking. A new SQLite store is created whole."""
    check_tracking_store(tracking_uri)
    ensure_sqlite_store(tracking_uri)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return RunHandle(tracking_uri, run_id)
    experiment_id = ensure_experiment(client, tracking_uri, experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    return RunHandle(tracking_uri, run.info.run_id)


RUN_FILE = "mlflow_run.json"


def open_job_run(out: Path, tracking_uri: str | None, experiment: str, *, run_name: str,
                 parent_run_id: str | None = None, tags: Mapping[str, str] | None = None) -> RunHandle | None:
    """The MLflow run of the job whose output dir is `out`: created once, re-opened by every later run of the job.

    Its id is kept in `<out>/mlflow_run.json`, so a job killed and run again logs into the same
    run (one job, one run). A different tracking store starts a new run there.
    """
    uri = tracking_uri or default_tracking_uri(out)
    run_file = storage.join(out, RUN_FILE)
    previous = None
    if storage.is_file(run_file):
        with contextlib.suppress(OSError, ValueError, InputError):
            previous = storage.read_json(run_file)
    run_id = previous["run_id"] if previous and previous.get("tracking_uri") == uri else None
    handle = open_run(uri, experiment, run_name=run_name, run_id=run_id, parent_run_id=parent_run_id,
                      tags={**(tags or {}), "bertflow.out": str(out)})
    if handle is not None and handle.run_id != run_id:
        storage.write_json(run_file, {"tracking_uri": handle.tracking_uri, "run_id": handle.run_id})
    return handle


def last_logged_step(handle: RunHandle | None, key: str) -> int | None:
    """The highest step at which `key` was logged in the run (None: never, or no tracking).

    A resumed job logs only the steps after it, so no step appears twice in the run's history.
    """
    if handle is None:
        return None
    from mlflow.tracking import MlflowClient

    try:
        history = MlflowClient(handle.tracking_uri).get_metric_history(handle.run_id, key)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail the job
        warnings.warn(f"could not read MLflow run {handle.run_id}: {exc}", stacklevel=2)
        return None
    return max((m.step for m in history), default=None)


def final_metric_values(handle: RunHandle | None, keys: tuple[str, ...]) -> dict[str, float]:
    """The value at the highest step of each of `keys` that the run has (empty without tracking)."""
    if handle is None:
        return {}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(handle.tracking_uri)
    values = {}
    for key in keys:
        try:
            history = client.get_metric_history(handle.run_id, key)
        except Exception as exc:  # noqa: BLE001 - tracking must never fail the job
            warnings.warn(f"could not read {key} of MLflow run {handle.run_id}: {exc}", stacklevel=2)
            continue
        if history:
            values[key] = max(history, key=lambda m: m.step).value
    return values


def finish_run(handle: RunHandle | None, status: str = "FINISHED") -> None:
    if handle is None:
        return
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(handle.tracking_uri).set_terminated(handle.run_id, status=status)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail the job
        warnings.warn(f"could not close MLflow run {handle.run_id}: {exc}", stacklevel=2)


def close_if_running(directory: Path, status: str = "FINISHED") -> bool:
    """End the MLflow run recorded in `<directory>/mlflow_run.json` if it is still RUNNING (a job killed
    after its output was complete, before it closed its run). True if it was ended."""
    run_file = storage.join(directory, RUN_FILE)
    try:
        if not storage.is_file(run_file):
            return False
        from mlflow.tracking import MlflowClient

        run = storage.read_json(run_file)
        client = MlflowClient(run["tracking_uri"])
        if client.get_run(run["run_id"]).info.status != "RUNNING":
            return False
        client.set_terminated(run["run_id"], status=status)
        return True
    except Exception as exc:  # noqa: BLE001 - tracking must never fail the job
        warnings.warn(f"could not check the MLflow run recorded in {run_file}: {exc}", stacklevel=2)
        return False


class MetricLogger:
    """Batched, asynchronous MLflow logging for one run (rank 0 only).

    `log_metrics` only enqueues; a daemon thread sends batches every `flush_every_s` seconds.
    A failing server turns logging off with one warning; training continues regardless.
    `handle=None` makes every call a no-op, so callers need no `if rank == 0` branches.
    `logged_through`: metrics of steps up to it are dropped (a resumed run re-doing those steps).
    """

    def __init__(self, handle: RunHandle | None, flush_every_s: float = 2.0, logged_through: int | None = None):
        self.handle = handle
        self.logged_through = logged_through  # a resumed run: steps up to here are in MLflow already
        self._queue: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._failed = False
        self._thread = None
        if handle is not None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(handle.tracking_uri)
            self._flush_every_s = flush_every_s
            self._thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
            self._thread.start()

    @property
    def active(self) -> bool:
        return self.handle is not None and not self._failed

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.active and (self.logged_through is None or step > self.logged_through):
            now = int(time.time() * 1000)
            self._queue.put(("metrics", [(k, float(v), now, step) for k, v in metrics.items()]))

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.active:
            self._queue.put(("params", flatten_params(params)))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.active:
            self._queue.put(("tags", dict(tags)))

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """Synchronous (artifacts are logged at the end of a job, not in the step loop)."""
        if self.active:
            self.flush()
            self._guard(lambda: self._client.log_artifacts(self.handle.run_id, str(local_dir), artifact_path))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            self.flush()
            self._guard(lambda: self._client.log_artifact(self.handle.run_id, str(local_path), artifact_path))

    def flush(self) -> None:
        if self._thread is not None:
            self._queue.join()

    def close(self) -> None:
        if self._thread is not None and not self._closed.is_set():
            self.flush()
            self._closed.set()
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ background thread

    def _guard(self, call) -> None:
        if self._failed:
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - tracking must never fail the job
            self._failed = True
            warnings.warn(f"MLflow logging failed ({exc}); logging is off for the rest of this run", stacklevel=2)

    def _run(self) -> None:
        from mlflow.entities import Metric, Param, RunTag

        while not self._closed.is_set():
            items = []
            try:
                items.append(self._queue.get(timeout=self._flush_every_s))
                while True:
                    items.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            metrics, params, tags = [], [], []
            for kind, payload in items:
                if kind == "metrics":
                    metrics.extend(Metric(k, v, ts, step) for k, v, ts, step in payload)
                elif kind == "params":
                    params.extend(Param(k, v) for k, v in payload.items())
                else:
                    tags.extend(RunTag(k, v) for k, v in payload.items())
            # MLflow takes at most 1000 metrics, 100 params and 100 tags per call
            calls = max(math.ceil(len(metrics) / _MAX_BATCH), math.ceil(len(params) / 100), math.ceil(len(tags) / 100))
            for i in range(calls):
                self._guard(lambda: self._client.log_batch(
                    self.handle.run_id, metrics=metrics[i * _MAX_BATCH : (i + 1) * _MAX_BATCH],
                    params=params[i * 100 : (i + 1) * 100], tags=tags[i * 100 : (i + 1) * 100]))
            for _ in items:
                self._queue.task_done()


# ----------------------------------------------------------------------------- pipelines


class PipelineTracker:
    """The MLflow side of a pipeline run: a parent run per run key, one nested run per stage, the report.

    The parent and stage run ids are kept in `<workdir>/runs/<run key>.json`, so re-running a
    spec (after a kill, or to add a stage) re-opens the same runs.
    """

    def __init__(self, spec, uri: str, run_key: str, git_revision: str):
        from mlflow.tracking import MlflowClient

        self.spec, self.uri, self.run_key = spec, uri, run_key
        self.client = MlflowClient(uri)
        self.state_file = storage.join(spec.workdir, "runs", f"{run_key}.json")  # a workdir may be on a store
        state = storage.read_json(self.state_file) if storage.is_file(self.state_file) else {}
        if state.get("tracking_uri") != uri:
            state = {}
        parent = open_run(uri, spec.experiment, run_name=f"{spec.name}-{run_key[:8]}", run_id=state.get("parent_run_id"),
                          tags={"bertflow.spec": str(spec.path), "bertflow.spec_name": spec.name,
                                "bertflow.run_key": run_key, "bertflow.git_revision": git_revision,
                                "bertflow.workdir": str(spec.workdir), "bertflow.overrides": " ".join(spec.overrides)})
        if parent is None:
            raise RuntimeError(f"MLflow tracking store {uri} cannot be reached")
        if not state.get("parent_run_id"):
            import yaml

            self.client.log_text(parent.run_id, yaml.safe_dump(_jsonable(spec.raw), sort_keys=False), "spec.yaml")
        self.parent = parent.run_id
        self.stage_runs: dict[str, str] = dict(state.get("stage_runs", {}))
        self._save()

    def _save(self) -> None:
        storage.write_json(self.state_file, {"tracking_uri": self.uri, "parent_run_id": self.parent,
                                             "stage_runs": self.stage_runs})

    def stage_run(self, node, cached: bool = False) -> str:
        """The stage's nested run: created with the stage's settings as params, or re-opened."""
        run_id = self.stage_runs.get(node.name)
        handle = open_run(self.uri, self.spec.experiment, run_name=node.name, run_id=run_id, parent_run_id=self.parent,
                          tags={"bertflow.node": node.name, "bertflow.stage": node.stage.kind, "bertflow.key": node.key,
                                "bertflow.out": str(node.final), "bertflow.cached": str(cached).lower()})
        if run_id is None:
            logger = MetricLogger(handle)
            logger.log_params(_jsonable(node.stage.config_fields))
            logger.close()
            self.stage_runs[node.name] = handle.run_id
            self._save()
        return handle.run_id

    def finish_stage(self, node, status: str, seconds: float, manifest: Mapping | None, error: str = "") -> None:
        import re

        run_id = self.stage_run(node)
        metrics = {"seconds": seconds}
        for k, v in ((manifest or {}).get("result") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                metrics[k] = float(v)
            elif isinstance(v, Mapping) and k == "metrics":
                metrics.update({str(m): float(x) for m, x in v.items() if isinstance(x, (int, float))})
        logger = MetricLogger(RunHandle(self.uri, run_id))
        logger.log_metrics({re.sub(r"[^A-Za-z0-9_\-./ ]", "_", k): v for k, v in metrics.items()}, 0)
        if error:
            logger.set_tags({"bertflow.error": error[:5000]})
        logger.close()
        self.client.set_terminated(run_id, status=status)

    def finish(self, ok: bool, report_dir: Path | None) -> None:
        if report_dir is not None and report_dir.is_dir():
            self.client.log_artifacts(self.parent, str(report_dir), "report")
        self.client.set_terminated(self.parent, status="FINISHED" if ok else "FAILED")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
