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

The workdir may be `s3://bucket/prefix` (`workdir:` in the spec, or `--workdir`): stage outputs, their
work prefixes and the MLflow artifacts (`<workdir>/mlartifacts/`) live there, the run holds the
workdir's lease instead of its flock (pipelines/dag/graph.py), and the default SQLite tracking store
lives in this machine's cache (`MLFLOW_TRACKING_URI` for one store across machines).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert import storage
from bert.errors import InputError
from pipelines.dag.schedule import RAY_IMAGE
from pipelines.ray_runtime import PROJECT_ROOT
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
    schedule.add_argument("--image", default=RAY_IMAGE, help="container image of the RayCronJob")
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
    graph.forced(getattr(args, "force", None) or [])  # an unknown stage name is an error now
    graph.wanted(getattr(args, "until", None) or [])
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
    from pipelines.tracking import check_tracking_store

    try:
        check_tracking_store(uri)  # the same rule as every job: a store that cannot be used is refused
    except InputError as exc:
        raise InputError(f"{exc} (unset MLFLOW_TRACKING_URI to track in SQLite under the workdir)") from None


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- run


def run_command(args: argparse.Namespace) -> int:
    from pipelines.dag.graph import workdir_lock
    from pipelines.dag.runner import run_graph
    from pipelines.ray_runtime import ensure_ray
    from pipelines.dag.runner import PipelineObserver
    from pipelines.tracking import PipelineTracker, default_tracking_uri

    started = time.time()
    p = plan(args)
    spec, graph = p.spec, p.graph
    run_key = args.run_key or p.run_key
    status = graph.status()
    print(f"spec {spec.path}: {len(graph.nodes)} stages, run key {run_key}, workdir {spec.workdir}")
    if args.dry_run:
        forced = graph.forced(args.force)
        print_table(graph, {n: ("would run" if n in forced or s != "cached" else s) for n, s in status.items()})
        return 0
    # Preflight: everything that can refuse does so before a file is written.
    check_ray_address(args.address or os.environ.get("RAY_ADDRESS"))
    storage.check_bucket(spec.workdir)  # a missing bucket, refused credentials, no store: one line, nothing written
    uri = default_tracking_uri(spec.workdir)
    check_tracking(uri)
    storage.make_dirs(spec.workdir)
    with workdir_lock(spec.workdir, wait=args.wait_lock) as lease:  # refuses at once if another run holds it
        tracker = PipelineTracker(spec, uri, run_key, git_revision())
        ensure_ray(args.address, int(spec.ray.get("num_cpus", 0)) or None, configure_logging=False)
        ok = False
        try:
            result = run_graph(graph, force=args.force, until=args.until, max_concurrent=spec.max_concurrent,
                               observer=PipelineObserver(tracker), lock=False, lease=lease)
            ok = True
        finally:
            report = next((n for n in graph.nodes.values() if n.stage.kind == "report" and n.is_done()), None)
            tracker.finish(ok, storage.local_copy(report.final, "stages") if report else None)
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
    if not storage.is_remote(os.path.expandvars(workdir)) and not Path(os.path.expandvars(workdir)).is_absolute():
        raise InputError(f"workdir {workdir!r} is relative: on a cluster it would land in the job's temporary "
                         "working dir; pass --workdir s3://bucket/prefix, or an absolute path on storage every node "
                         "shares")
    command = ["python", "-m", "pipelines.cli", "run", str(relative_spec), "--workdir", workdir]
    for item in args.overrides:
        command += ["--set", item]
    for stage in args.force:
        command += ["--force", stage]
    if args.run_key:
        command += ["--run-key", args.run_key]
    entrypoint = shlex.join(command)
    env_vars = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "BERTFLOW_DATASETS") if os.environ.get(k)}
    # the store this shell names (for an s3:// workdir or any URI input); never its secrets (the Ray dashboard
    # shows a job's env): credentials on the cluster come from its nodes (instance profile)
    env_vars |= {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
                                            "AWS_DEFAULT_REGION") if os.environ.get(k)}
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


def schedule_command(args: argparse.Namespace) -> int:
    import yaml

    from pipelines.dag.schedule import crontab_line, ray_cron_job, validate_cron

    cron = validate_cron(args.cron)
    p = plan(args)
    spec_path = Path(args.spec).resolve()
    workdir = args.workdir or str(p.spec.workdir)
    print("# crontab line (crontab -e); a run that finds the previous one still going waits for it:")
    print(crontab_line(cron, PROJECT_ROOT, spec_path, workdir, args.overrides, args.address))
    relative = spec_path.relative_to(PROJECT_ROOT) if spec_path.is_relative_to(PROJECT_ROOT) else spec_path
    manifest = ray_cron_job(cron, p.spec.name, str(relative), workdir, args.overrides, args.image)
    print("---\n# KubeRay RayCronJob (kubectl apply -f -); the workdir lives on a shared ReadWriteMany volume:")
    print(yaml.safe_dump(manifest, sort_keys=False), end="")
    return 0
