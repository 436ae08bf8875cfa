"""`bertflow run | status | submit | schedule`: run a pipeline spec (pipelines/*.yaml) as a DAG on Ray.

    bertflow run SPEC [--set k=v]... [--dry-run] [--force STAGE] [--run-key KEY] [--workdir DIR]
    bertflow status SPEC [--set k=v]... [--workdir DIR]
    bertflow submit SPEC --address URL [--set k=v]... [--workdir DIR] [--wait]
    bertflow schedule SPEC --cron EXPR [--address URL] [--workdir DIR]

`run` checks the whole spec, Ray and MLflow before it writes anything, then holds the workdir
lock and runs every stage that is not cached. MLflow: one parent run per run key (tagged with
the spec, the run key and the git revision; a re-run of the same spec re-opens it), one nested
run per stage, and the report stage's files as artifacts of the parent run. Tracking defaults
to SQLite under the workdir; `MLFLOW_TRACKING_URI` points it at a server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert.errors import InputError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
JOB_EXCLUDES = [".git", ".venv", "venv", ".ci-venv", "out", "workdir", "data/root", "build", "dist", "*.egg-info",
                "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "mlruns", "mlartifacts", "*.db"]


def register(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec", metavar="SPEC", help="a pipeline spec, e.g. pipelines/quickstart.yaml")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting: STAGE.FIELD=VALUE (STAGE a stage name or kind), or a top-level key")
        p.add_argument("--workdir", metavar="DIR", help="where stage outputs live (default: the spec's workdir)")

    run = sub.add_parser("run", help="run a pipeline spec: every stage not already done, on Ray",
                         description="Run the stages of a pipeline spec that are not cached in the workdir.")
    common(run)
    run.add_argument("--dry-run", action="store_true", help="validate and show what would run; write nothing")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="run STAGE (a name, kind or prefix) and everything downstream again")
    run.add_argument("--until", action="append", default=[], metavar="STAGE",
                     help="run only STAGE (a name, kind or prefix) and the stages it needs")
    run.add_argument("--run-key", metavar="KEY", help="name of this run (its MLflow parent run); "
                     "default: a hash of every stage key, so re-running a spec re-opens its run")
    run.add_argument("--address", metavar="ADDR", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument("--wait-lock", action="store_true", help="wait for another run of the workdir instead of refusing")
    run.set_defaults(handler=run_command)

    status = sub.add_parser("status", help="each stage of a spec: cached / missing / running / failed")
    common(status)
    status.set_defaults(handler=status_command)

    submit = sub.add_parser("submit", help="run a spec on a Ray cluster as a Ray job (ships this project)")
    common(submit)
    submit.add_argument("--address", required=True, metavar="URL", help="Ray dashboard address, e.g. http://head:8265")
    submit.add_argument("--wait", action="store_true", help="stream the job's logs and wait for it to end")
    submit.add_argument("--force", action="append", default=[], metavar="STAGE")
    submit.add_argument("--run-key", metavar="KEY")
    submit.set_defaults(handler=submit_command)

    schedule = sub.add_parser("schedule", help="print a crontab line and a KubeRay RayCronJob running the spec")
    common(schedule)
    schedule.add_argument("--cron", required=True, metavar="EXPR", help='five-field cron expression, e.g. "0 3 * * *"')
    schedule.add_argument("--address", metavar="URL", help="Ray dashboard address for the crontab line's `submit`")
    schedule.add_argument("--image", default="rayproject/ray:2.49.0-py311-gpu", help="container image of the RayCronJob")
    schedule.set_defaults(handler=schedule_command)


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Plan:
    spec: Any  # pipelines.dag.spec.Spec
    graph: Any  # pipelines.dag.graph.Graph

    @property
    def run_key(self) -> str:
        return self.graph.run_key()


def plan(args: argparse.Namespace) -> Plan:
    """Load, override and validate the spec; build the graph (keys, dirs). Writes nothing."""
    from pipelines.dag.graph import Graph
    from pipelines.dag.spec import load_spec
    from pipelines.dag.stages import build_stages

    spec = load_spec(args.spec, args.overrides, args.workdir)
    graph = Graph.build(build_stages(spec), spec.workdir)
    for pattern in (getattr(args, "force", None) or []) + (getattr(args, "until", None) or []):
        graph.select(pattern)
    return Plan(spec, graph)


def print_table(graph, status: dict[str, str]) -> None:
    width = max(len(n) for n in graph.nodes)
    for n, node in graph.nodes.items():
        print(f"{n:<{width}}  {status[n]:<8} {node.key}  {node.final}")


def status_command(args: argparse.Namespace) -> int:
    p = plan(args)
    status = p.graph.status()
    print(f"spec {p.spec.path} (run key {p.run_key}), workdir {p.spec.workdir}")
    print_table(p.graph, status)
    counts = {s: list(status.values()).count(s) for s in ("cached", "running", "failed", "missing")}
    print(", ".join(f"{v} {k}" for k, v in counts.items() if v))
    return 0


# ----------------------------------------------------------------------------- preflight checks


def check_ray_address(address: str | None) -> None:
    """A Ray address that cannot be reached is an InputError before anything is written."""
    import socket

    if not address or address in ("auto", "local"):
        return
    match = re.match(r"^(?:ray://|https?://)?\[?([^\]/:]+)\]?:(\d+)", address)
    if not match:
        raise InputError(f"Ray address {address!r}: expected HOST:PORT, ray://HOST:PORT or http://HOST:PORT")
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise InputError(f"cannot reach the Ray cluster at {address}: {exc}") from None


def check_tracking(uri: str) -> None:
    from pipelines.tracking import check_reachable

    reason = check_reachable(uri)
    if reason:
        raise InputError(f"{reason} (unset MLFLOW_TRACKING_URI to track in SQLite under the workdir)")


def tracking_uri_for(workdir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / 'mlflow.db'}"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- MLflow


class Tracker:
    """The MLflow side of a pipeline run: parent run, one nested run per stage, report artifacts."""

    def __init__(self, plan: Plan, uri: str, run_key: str):
        from mlflow.tracking import MlflowClient

        self.plan, self.uri, self.run_key = plan, uri, run_key
        self.client = MlflowClient(uri)
        spec = plan.spec
        experiment = self.client.get_experiment_by_name(spec.experiment)
        if experiment is None:
            location = None if uri.startswith(("http://", "https://")) else (spec.workdir / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(spec.experiment, artifact_location=location)
        else:
            self.experiment_id = experiment.experiment_id
        state_file = spec.workdir / "runs" / f"{run_key}.json"
        self.state_file = state_file
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        if state.get("tracking_uri") != uri:
            state = {}
        if state.get("parent_run_id"):
            self.parent = state["parent_run_id"]
            self.client.update_run(self.parent, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=f"{spec.name}-{run_key[:8]}", tags={
                "bertflow.spec": str(spec.path), "bertflow.spec_name": spec.name, "bertflow.run_key": run_key,
                "bertflow.git_revision": git_revision(), "bertflow.workdir": str(spec.workdir),
                "bertflow.overrides": " ".join(spec.overrides),
            })
            self.parent = run.info.run_id
            self.client.log_text(self.parent, _yaml(spec.raw), "spec.yaml")
        self.stage_runs: dict[str, str] = dict(state.get("stage_runs", {}))
        self._save()

    def _save(self) -> None:
        from bert.fsutil import write_json_atomic

        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_file, {"tracking_uri": self.uri, "parent_run_id": self.parent,
                                            "stage_runs": self.stage_runs})

    def stage_run(self, node, cached: bool = False) -> str:
        run_id = self.stage_runs.get(node.name)
        if run_id is None:
            from pipelines.tracking import flatten_params

            run = self.client.create_run(self.experiment_id, run_name=node.name, tags={
                "mlflow.parentRunId": self.parent, "bertflow.node": node.name, "bertflow.stage": node.stage.kind,
                "bertflow.key": node.key, "bertflow.out": str(node.final), "bertflow.cached": str(cached).lower(),
            })
            run_id = run.info.run_id
            params = flatten_params(_jsonable(node.stage.config_fields))
            items = list(params.items())
            from mlflow.entities import Param

            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
            self.stage_runs[node.name] = run_id
            self._save()
        else:
            self.client.update_run(run_id, status="RUNNING")
        return run_id

    def finish_stage(self, node, status: str, seconds: float, manifest: dict | None, error: str = "") -> None:
        run_id = self.stage_run(node)
        metrics = {"seconds": seconds}
        for k, v in ((manifest or {}).get("result") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                metrics[k] = float(v)
            elif isinstance(v, dict) and k == "metrics":
                metrics.update({f"{m}": float(x) for m, x in v.items() if isinstance(x, (int, float))})
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        safe = {re.sub(r"[^A-Za-z0-9_\-./ ]", "_", k): v for k, v in metrics.items()}
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in safe.items()])
        if error:
            self.client.set_tag(run_id, "bertflow.error", error[:5000])
        self.client.set_terminated(run_id, status=status)

    def finish(self, ok: bool, report_dir: Path | None) -> None:
        if report_dir is not None and report_dir.is_dir():
            self.client.log_artifacts(self.parent, str(report_dir), "report")
        self.client.set_terminated(self.parent, status="FINISHED" if ok else "FAILED")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _yaml(raw: Any) -> str:
    import yaml

    return yaml.safe_dump(_jsonable(raw), sort_keys=False)


class TrackingObserver:
    """Progress lines (from the DAG's default observer) plus the MLflow stage runs."""

    def __init__(self, tracker: Tracker | None):
        from pipelines.dag.graph import Observer

        self.printer = Observer()
        self.tracker = tracker

    def stage_tracking(self, node):
        if self.tracker is None:
            return None
        return {"tracking_uri": self.tracker.uri, "run_id": self.tracker.stage_run(node),
                "experiment": self.tracker.plan.spec.experiment}

    def on_event(self, node, event) -> None:
        self.printer.on_event(node, event)
        if self.tracker is None:
            return
        if event.event == "cached" and node.name not in self.tracker.stage_runs:
            self.tracker.stage_run(node, cached=True)
            self.tracker.finish_stage(node, "FINISHED", 0.0, event.manifest)
        elif event.event == "done":
            self.tracker.finish_stage(node, "FINISHED", event.seconds, dict(event.manifest or {}))
        elif event.event == "failed":
            self.tracker.finish_stage(node, "FAILED", event.seconds, None, event.error)


# ----------------------------------------------------------------------------- run


def ensure_ray(address: str | None, spec) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, configure_logging=False)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(configure_logging=False)
    else:
        from pipelines.ray_runtime import start_local_ray

        num_cpus = int(spec.ray.get("num_cpus", max(4, os.cpu_count() or 1)))
        start_local_ray(num_cpus, {"PYTHONPATH": os.pathsep.join(
            [str(PROJECT_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])},
            configure_logging=False)


def run_command(args: argparse.Namespace) -> int:
    from pipelines.dag.graph import run_graph, workdir_lock

    started = time.time()
    p = plan(args)
    spec, graph = p.spec, p.graph
    run_key = args.run_key or p.run_key
    status = graph.status()
    print(f"spec {spec.path}: {len(graph.nodes)} stages, run key {run_key}, workdir {spec.workdir}")
    if args.dry_run:
        forced = set()
        for pattern in args.force:
            for n in graph.select(pattern):
                forced.update([n, *graph.descendants(n)])
        print_table(graph, {n: ("would run" if n in forced or s != "cached" else s) for n, s in status.items()})
        return 0
    # Preflight: everything that can refuse does so before a file is written.
    address = args.address or os.environ.get("RAY_ADDRESS")
    check_ray_address(address)
    uri = tracking_uri_for(spec.workdir)
    check_tracking(uri)
    spec.workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lock(spec.workdir, wait=args.wait_lock):  # refuses at once if another run holds it
        tracker = Tracker(p, uri, run_key)
        ensure_ray(args.address, spec)
        ok = False
        try:
            result = run_graph(graph, force=args.force, until=args.until, max_concurrent=spec.max_concurrent,
                               observer=TrackingObserver(tracker), lock=False)
            ok = True
        finally:
            report = next((n for n in graph.nodes.values() if n.stage.kind == "report" and n.is_done()), None)
            tracker.finish(ok, report.final if report else None)
    print(f"pipeline {spec.name}: {len(result.done)} stage(s) ran, {len(result.cached)} cached, "
          f"in {time.time() - started:.1f}s; MLflow parent run {tracker.parent} ({uri})")
    return 0


# ----------------------------------------------------------------------------- submit


def submit_command(args: argparse.Namespace) -> int:
    p = plan(args)  # validate locally before shipping anything
    spec_path = Path(args.spec).resolve()
    try:
        relative_spec = spec_path.relative_to(PROJECT_ROOT)
    except ValueError:
        raise InputError(f"{spec_path}: submit ships the project dir {PROJECT_ROOT}; put the spec inside it") from None
    workdir = args.workdir or p.spec.raw["workdir"]
    if not Path(os.path.expandvars(workdir)).is_absolute():
        raise InputError(f"workdir {workdir!r} is relative: on a cluster it would land in the job's temporary "
                         "working dir; pass an absolute --workdir on storage every node shares")
    command = ["python", "-m", "pipelines.cli", "run", str(relative_spec), "--workdir", workdir]
    for item in args.overrides:
        command += ["--set", item]
    for stage in args.force:
        command += ["--force", stage]
    if args.run_key:
        command += ["--run-key", args.run_key]
    entrypoint = shlex.join(command)
    env_vars = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "BERTFLOW_DATASETS") if os.environ.get(k)}
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the user's address
        raise InputError(f"cannot reach the Ray cluster at {args.address}: {exc}") from None
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={
        "working_dir": str(PROJECT_ROOT), "excludes": JOB_EXCLUDES, "env_vars": env_vars})
    print(f"submitted job {job_id} to {args.address}: {entrypoint}", flush=True)
    if not args.wait:
        print(f"follow it with: ray job logs --address {args.address} --follow {job_id}")
        return 0
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


# ----------------------------------------------------------------------------- schedule

_CRON_FIELDS = (("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}),
                ("month", 1, 12, {m: i + 1 for i, m in enumerate(
                    "jan feb mar apr may jun jul aug sep oct nov dec".split())}),
                ("day of week", 0, 7, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}))
_CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def validate_cron(expr: str) -> str:
    """A standard five-field cron expression (or @daily etc.); InputError naming the bad field."""
    expr = " ".join(expr.split())
    if expr in _CRON_MACROS:
        return expr
    fields = expr.split(" ")
    if len(fields) != 5:
        raise InputError(f"cron expression {expr!r}: expected 5 fields (minute hour day-of-month month "
                         f"day-of-week) or one of {', '.join(_CRON_MACROS)}, got {len(fields)}")
    for text, (name, lo, hi, names) in zip(fields, _CRON_FIELDS):
        for part in text.split(","):
            base, _, step = part.partition("/")
            if step and (not step.isdigit() or int(step) == 0):
                raise InputError(f"cron expression {expr!r}: {name} step {step!r} must be a positive integer")
            if base == "*":
                continue
            ends = base.split("-")
            if len(ends) > 2 or not all(ends):
                raise InputError(f"cron expression {expr!r}: {name} {part!r} is not N, N-M, */S or N-M/S")
            values = []
            for end in ends:
                value = names.get(end.lower(), int(end) if end.isdigit() else None)
                if value is None or not lo <= value <= hi:
                    raise InputError(f"cron expression {expr!r}: {name} {end!r} is not in {lo}-{hi}")
                values.append(value)
            if len(values) == 2 and values[0] > values[1]:
                raise InputError(f"cron expression {expr!r}: {name} range {part!r} runs backwards")
    return expr


def schedule_command(args: argparse.Namespace) -> int:
    import yaml

    cron = validate_cron(args.cron)
    p = plan(args)
    spec_path = Path(args.spec).resolve()
    workdir = args.workdir or str(p.spec.workdir)
    sets = [x for item in args.overrides for x in ("--set", item)]
    log = Path(workdir) / "cron.log"
    if args.address:
        action = ["submit", str(spec_path), "--address", args.address, "--workdir", workdir, "--wait", *sets]
    else:
        action = ["run", str(spec_path), "--workdir", workdir, "--wait-lock", *sets]
    print("# crontab line (crontab -e); a run that finds the previous one still going waits for it:")
    print(f"{cron} cd {shlex.quote(str(PROJECT_ROOT))} && {shlex.quote(sys.executable)} -m pipelines.cli "
          f"{shlex.join(action)} >> {shlex.quote(str(log))} 2>&1")
    relative = spec_path.relative_to(PROJECT_ROOT) if spec_path.is_relative_to(PROJECT_ROOT) else spec_path
    entrypoint = shlex.join(["python", "-m", "pipelines.cli", "run", str(relative), "--workdir", workdir,
                             "--wait-lock", *sets])
    manifest = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCronJob",
        "metadata": {"name": f"bertflow-{re.sub(r'[^a-z0-9-]', '-', p.spec.name.lower())}"},
        "spec": {
            "schedule": cron,
            "concurrencyPolicy": "Forbid",
            "jobTemplate": {
                "entrypoint": entrypoint,
                "shutdownAfterJobFinishes": True,
                "ttlSecondsAfterFinished": 3600,
                "runtimeEnvYAML": yaml.safe_dump({"working_dir": "/workspace/bertflow",
                                                  "env_vars": {"BERTFLOW_WORKDIR": workdir}}),
                "rayClusterSpec": {
                    "rayVersion": "2.49.0",
                    "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": {"spec": {"containers": [{
                        "name": "ray-head", "image": args.image,
                        "volumeMounts": [{"name": "workdir", "mountPath": str(Path(workdir).parent)}]}],
                        "volumes": [{"name": "workdir", "persistentVolumeClaim": {"claimName": "bertflow-workdir"}}]}}},
                    "workerGroupSpecs": [{"groupName": "gpu", "replicas": 1, "minReplicas": 0, "maxReplicas": 4,
                                          "rayStartParams": {}, "template": {"spec": {"containers": [{
                                              "name": "ray-worker", "image": args.image,
                                              "resources": {"limits": {"nvidia.com/gpu": 1}},
                                              "volumeMounts": [{"name": "workdir",
                                                                "mountPath": str(Path(workdir).parent)}]}],
                                              "volumes": [{"name": "workdir", "persistentVolumeClaim": {
                                                  "claimName": "bertflow-workdir"}}]}}}],
                },
            },
        },
    }
    print("---\n# KubeRay RayCronJob (kubectl apply -f -); the workdir lives on a shared ReadWriteMany volume:")
    print(yaml.safe_dump(manifest, sort_keys=False), end="")
    return 0
