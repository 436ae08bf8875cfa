"""The one skeleton every job's driver runs: `run_job(job, config)`.

    required    the settings a run cannot do without, named as the CLI spells them
    resolve     path settings made absolute (the workers may run in another directory); `settle`:
                settings that need them (a sweep's space), checked without reading any input
    finished?   a finished run of the same job and settings in --out: its result, nothing else done
                (an MLflow run such a run left RUNNING, killed just before closing it, is ended)
    tracking    the store checked (`check_tracking_store`: one rule for every job), in seconds
    preflight   everything checkable, before anything is written or any worker starts
    claim       --out owned and locked (`pipelines/outdir.claim_dir`): absent, or this job's unfinished run;
                the processes of an earlier run that wrote into it have exited; on an object store
                the output's lease (`pipelines/lease.py`), whose fence the job hands to its workers
    tracking    the job's MLflow run (`pipelines/tracking.open_job_run`): created once, re-opened by a resume
    run         the job's own work (`Job.run`); if it raises, the MLflow run ends FAILED

`--out` may be a local path or an object-store URI (DESIGN.md, principle 11): `Claimed.out` is then
the URI string (`bert/storage.py` reads and writes it), the tracking store is local to this machine
unless `--tracking-uri` / MLFLOW_TRACKING_URI names a server, and MLflow's artifacts go under the
URI (`pipelines/tracking.default_tracking_uri`). A job that cannot write to a store says so
(`Job.remote_out = False`) and a URI `--out` is refused before anything is read.

A job is a subclass of `Job` that fills in the steps that differ (what is required, how a
finished run is found, what preflight checks, what the run does); the order above, the output
rule and the tracking rule are written here once. The workers' side of a Ray Train job (restore,
precision agreement, checkpoints) is in `pipelines/jobs/launch.py`; what one device does is in `bert/`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from bert.errors import InputError
from pipelines.config_args import resolve_paths
from bert import storage
from pipelines.outdir import check_disjoint, claim_dir
from pipelines.tracking import (
    RunHandle,
    check_tracking_store,
    close_if_running,
    default_tracking_uri,
    finish_run,
    open_job_run,
)

C = TypeVar("C")


@dataclass(frozen=True)
class Claimed(Generic[C]):
    """What a job holds while it runs: its settings (paths resolved), its output dir, its MLflow store and run."""

    config: C
    out: Path | str  # a URI string for an output on an object store
    tracking_uri: str
    run: RunHandle | None
    lease: Any = None  # pipelines.lease.S3Lease / LocalLease: `fence()` for the workers that commit into out


class Job(Generic[C]):
    """The steps of one kind of job that differ from the others; `run_job` calls them in order."""

    name: ClassVar[str]  # the kind of output dir ("pretrain"), and the prefix of every message
    required: ClassVar[tuple[str, ...]]  # config fields a run needs, e.g. ("shards", "out")
    paths: ClassVar[tuple[str, ...]]  # config fields holding paths, made absolute before anything else
    remote_out: ClassVar[bool] = True  # False: --out must be a local path (the job cannot write to a store yet)

    def path_fields(self, config: C) -> tuple[str, ...]:
        return self.paths

    def settle(self, config: C) -> None:
        """Checks of the settings that need the resolved paths (nothing read yet); none by default."""

    def finished(self, config: C) -> dict[str, Any] | None:
        """The result of a finished run of this job and settings in `config.out`, else None."""
        raise NotImplementedError

    def preflight(self, config: C) -> Any:
        """Every check that can be made before work starts; returns what the run needs from them."""
        raise NotImplementedError

    def identity(self, config: C) -> Mapping[str, Any]:
        """The settings that define the output: a re-run must match them to resume into the same dir."""
        return config.identity()  # type: ignore[attr-defined]

    def inputs(self, config: C) -> list[Any]:
        """The paths the job reads: its output may be none of them, nor lie inside or around one."""
        return []

    def run_name(self, config: C) -> str | None:
        """The name of the job's own MLflow run; None: the job opens none of its own (its parts do)."""
        return None

    def tags(self, config: C) -> dict[str, str]:
        return {"bertflow.stage": self.name}

    def run(self, claimed: Claimed[C], checked: Any) -> dict[str, Any]:
        """The work, with the output claimed; ends its MLflow run itself when it succeeds."""
        raise NotImplementedError


def run_job(job: Job[C], config: C) -> dict[str, Any]:
    """required -> resolve -> finished? -> preflight -> claim -> tracking -> run (see the module docstring)."""
    missing = [f"--{name.replace('_', '-')}" for name in job.required if not getattr(config, name)]
    if missing:
        names = missing[0] if len(missing) == 1 else f"{', '.join(missing[:-1])} and {missing[-1]}"
        raise InputError(f"{job.name}: {names} {'is' if len(missing) == 1 else 'are'} required")
    config = resolve_paths(config, job.path_fields(config))
    job.settle(config)
    out = _output(job, config.out)  # type: ignore[attr-defined]
    check_disjoint(out, job.inputs(config))  # first: an output that is an input is refused as such
    done = job.finished(config)
    if done is not None:
        print(f"[{job.name}] {out} is complete; nothing to do", flush=True)
        close_if_running(out)  # a run killed between its last output and closing its MLflow run
        return done
    storage.check_bucket(out)  # a missing bucket, bad credentials, an unreachable store: one line, in seconds
    uri = config.tracking_uri or default_tracking_uri(out)  # type: ignore[attr-defined]
    check_tracking_store(uri)  # unusable: one line, before any input is read, anything written or Ray starts
    checked = job.preflight(config)
    with claim_dir(out, job.name, job.identity(config), inputs=job.inputs(config)) as (_, lease):
        from pipelines.ray_runtime import ensure_ray

        ensure_ray()
        name = job.run_name(config)
        handle = None
        if name is not None:
            handle = open_job_run(out, uri, config.experiment, run_name=name,  # type: ignore[attr-defined]
                                  parent_run_id=config.parent_run_id, tags=job.tags(config))  # type: ignore[attr-defined]
        try:
            return job.run(Claimed(config, out, uri, handle, lease), checked)
        except BaseException:
            finish_run(handle, "FAILED")
            raise


def _output(job: Job[Any], out: str) -> Path | str:
    """--out as the job uses it: a `Path`, or the URI string of an output on an object store."""
    if not storage.is_remote(out):
        return Path(out)
    if not job.remote_out:
        raise InputError(f"{job.name}: --out {out}: this job writes to a local path only for now; "
                         "give a local --out (nothing was written)")
    return out.rstrip("/")
