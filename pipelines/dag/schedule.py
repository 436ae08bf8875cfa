"""Running a pipeline on a schedule: a checked cron expression, a crontab line, a KubeRay RayCronJob.

The crontab line runs on this machine (its paths are this machine's); the RayCronJob runs on Kubernetes
with KubeRay >= v1.6 and its RayCronJob feature gate on, in an image built from the repo's `Dockerfile`,
with no path of this machine in it (see `ray_cron_job`).

A scheduled run is an ordinary `bertflow run` (locally, or `bertflow submit` to a cluster) that
waits for the workdir lock instead of refusing, so a run that outlasts its period delays the next
one instead of colliding with it; cached stages make the repeat cheap.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from bert.errors import InputError

_CRON_FIELDS = (("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}),
                ("month", 1, 12, {m: i + 1 for i, m in enumerate(
                    "jan feb mar apr may jun jul aug sep oct nov dec".split())}),
                ("day of week", 0, 7, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}))
_CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")

# The RayCronJob: what it needs from the cluster, and what it runs.
RAY_VERSION = "2.60.0"  # the Ray of the image (Dockerfile's base); tests check it against pyproject and the install
KUBERAY_REQUIREMENT = ("KubeRay >= v1.6.0 (ray.io/v1 RayCronJob, alpha) with the operator's RayCronJob feature gate "
                       "on: --feature-gates=RayCronJob=true (off by default)")
BERTFLOW_IMAGE = "bertflow:0.1.0"  # built from the repo's Dockerfile (rayproject/ray + bertflow); push it, pass --image
RAY_IMAGE = BERTFLOW_IMAGE  # the default of `bertflow schedule --image`
IMAGE_PROJECT = "/workspace/bertflow"  # where the Dockerfile puts the project in the image
VOLUME_MOUNT = "/mnt/bertflow"  # the shared volume (PVC bertflow-workdir) in every pod: workdirs, datasets, specs


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
            _check_cron_part(expr, part, name, lo, hi, names)
    return expr


def _check_cron_part(expr: str, part: str, name: str, lo: int, hi: int, names: dict[str, int]) -> None:
    base, _, step = part.partition("/")
    if step and (not step.isdigit() or int(step) == 0):
        raise InputError(f"cron expression {expr!r}: {name} step {step!r} must be a positive integer")
    if base == "*":
        return
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


def crontab_line(cron: str, project_root: Path, spec_path: Path, workdir: str, overrides: list[str],
                 address: str | None) -> str:
    """A crontab entry: `submit --wait` to a cluster, or a local `run --wait-lock`, appending to <workdir>/cron.log."""
    sets = [x for item in overrides for x in ("--set", item)]
    if address:
        action = ["submit", str(spec_path), "--address", address, "--workdir", workdir, "--wait", *sets]
    else:
        action = ["run", str(spec_path), "--workdir", workdir, "--wait-lock", *sets]
    log = Path(workdir) / "cron.log"
    # the log's dir first: a first run into a new workdir would otherwise fail at the redirection, silently
    return (f"{cron} cd {shlex.quote(str(project_root))} && mkdir -p {shlex.quote(workdir)} && "
            f"{shlex.quote(sys.executable)} -m pipelines.cli "
            f"{shlex.join(action)} >> {shlex.quote(str(log))} 2>&1")


def ray_cron_job(cron: str, name: str, entry_spec: str, workdir: str, overrides: list[str],
                 image: str = BERTFLOW_IMAGE, tracking_uri: str | None = None) -> dict[str, Any]:
    """A KubeRay `RayCronJob` (ray.io/v1) that runs the spec on an ephemeral cluster of `image`.

    Nothing in it is a path of this machine: the spec is read from the image (`entry_spec` relative to
    the project) or, for a spec outside the project, from the shared volume (`$BERTFLOW_SPECS`); the
    workdir is `$BERTFLOW_WORKDIR`, on the shared volume, named after `workdir`'s last part; datasets
    are `$BERTFLOW_DATASETS` on the volume; MLflow is `tracking_uri` when it is a server (http/https),
    else the pipeline's default store inside the workdir. The schema has no concurrency policy: a run
    that finds the previous one still going waits for it (`--wait-lock`).
    """
    sets = [x for item in overrides for x in ("--set", item)]
    in_image = not Path(entry_spec).is_absolute()
    spec_path = f"{IMAGE_PROJECT}/{entry_spec}" if in_image else f"$BERTFLOW_SPECS/{Path(entry_spec).name}"
    run = shlex.join(["bertflow", "run", "SPEC", "--workdir", "WORKDIR", "--wait-lock", *sets])
    entrypoint = run.replace("SPEC", f'"{spec_path}"', 1).replace("WORKDIR", '"$BERTFLOW_WORKDIR"', 1)
    env = {"BERTFLOW_WORKDIR": f"{VOLUME_MOUNT}/work/{Path(workdir).name}",
           "BERTFLOW_DATASETS": f"{VOLUME_MOUNT}/datasets", "BERTFLOW_SPECS": f"{VOLUME_MOUNT}/specs"}
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    import yaml

    slug = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCronJob",
        "metadata": {"name": f"bertflow-{slug}"[:52], "labels": {"app.kubernetes.io/name": "bertflow"},
                     "annotations": {"bertflow/requires": KUBERAY_REQUIREMENT,
                                     "bertflow/image": f"{image}: build it from the repo's Dockerfile "
                                                       f"(rayproject/ray:{RAY_VERSION} + bertflow)"}},
        "spec": {
            "schedule": cron,
            "suspend": False,
            "jobTemplate": {
                "entrypoint": entrypoint,
                "shutdownAfterJobFinishes": True,
                "ttlSecondsAfterFinished": 3600,
                "runtimeEnvYAML": yaml.safe_dump({"env_vars": env}, sort_keys=False),
                "rayClusterSpec": _ray_cluster_spec(image),
            },
        },
    }


def _ray_cluster_spec(image: str) -> dict[str, Any]:
    """A head that schedules nothing, and up to 4 one-GPU workers; every pod mounts the shared volume."""
    def pod(container: str, **resources: Any) -> dict[str, Any]:  # a fresh dict per pod: no YAML anchors
        return {"spec": {"containers": [{"name": container, "image": image, **resources,
                                         "volumeMounts": [{"name": "bertflow", "mountPath": VOLUME_MOUNT}]}],
                         "volumes": [{"name": "bertflow", "persistentVolumeClaim": {"claimName": "bertflow-workdir"}}]}}

    return {
        "rayVersion": RAY_VERSION,
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": pod("ray-head")},
        "workerGroupSpecs": [{"groupName": "gpu", "replicas": 1, "minReplicas": 0, "maxReplicas": 4,
                              "rayStartParams": {},
                              "template": pod("ray-worker", resources={"limits": {"nvidia.com/gpu": 1}})}],
    }
