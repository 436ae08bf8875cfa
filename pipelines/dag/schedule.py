"""Running a pipeline on a schedule: a checked cron expression, a crontab line, a KubeRay RayCronJob.

A scheduled run is an ordinary `bertflow run` (locally, or `bertflow submit` to a cluster) that
waits for the workdir lock instead of refusing, so a run that outlasts its period delays the next
one instead of colliding with it; cached stages make the repeat cheap.
"""

from __future__ import annotations

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
RAY_IMAGE = "rayproject/ray:2.49.0-py311-gpu"


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
    return (f"{cron} cd {shlex.quote(str(project_root))} && {shlex.quote(sys.executable)} -m pipelines.cli "
            f"{shlex.join(action)} >> {shlex.quote(str(log))} 2>&1")


def ray_cron_job(cron: str, name: str, entry_spec: str, workdir: str, overrides: list[str],
                 image: str = RAY_IMAGE) -> dict[str, Any]:
    """A KubeRay `RayCronJob` that runs the spec on an ephemeral cluster; the workdir on a shared volume."""
    sets = [x for item in overrides for x in ("--set", item)]
    entrypoint = shlex.join(["python", "-m", "pipelines.cli", "run", entry_spec, "--workdir", workdir,
                             "--wait-lock", *sets])
    volume = [{"name": "workdir", "persistentVolumeClaim": {"claimName": "bertflow-workdir"}}]
    mount = [{"name": "workdir", "mountPath": str(Path(workdir).parent)}]
    import yaml

    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCronJob",
        "metadata": {"name": f"bertflow-{re.sub(r'[^a-z0-9-]', '-', name.lower())}"},
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
                    "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": {"spec": {
                        "containers": [{"name": "ray-head", "image": image, "volumeMounts": mount}],
                        "volumes": volume}}},
                    "workerGroupSpecs": [{"groupName": "gpu", "replicas": 1, "minReplicas": 0, "maxReplicas": 4,
                                          "rayStartParams": {}, "template": {"spec": {
                                              "containers": [{"name": "ray-worker", "image": image,
                                                              "resources": {"limits": {"nvidia.com/gpu": 1}},
                                                              "volumeMounts": mount}],
                                              "volumes": volume}}}],
                },
            },
        },
    }
