"""The one skeleton every job's driver runs: `run_job(job, config)`, for all seven commands.

    required    the settings a run cannot do without, named as the CLI spells them
    resolve     path settings made absolute (the workers may run in another directory); `settle`:
                settings that need them (a sweep's space), checked without reading any input
    disjoint    the output is none of the inputs, nor inside or around one (`pipelines/outdir.check_disjoint`)
    finished?   a job dir: a finished run of the same job and settings is the result, nothing else done
                (an MLflow run such a run left RUNNING, killed just before closing it, is ended); a
                one-piece output that exists is refused (`check_new`, `check_unfinished`)
    tracking    the store checked (`check_tracking_store`: one rule for every job that logs), in seconds
    preflight   everything checkable, before anything is written or any worker starts
    claim       the output owned and locked, by its kind (`Job.output`):
                JOB_DIR, RESUMABLE  `pipelines/outdir.claim_dir`: absent, or this job's unfinished run; the
                                    processes of an earlier run that wrote into it have exited; on an object
                                    store the output's lease (`pipelines/lease.py`), whose fence the job hands
                                    to its workers. RESUMABLE: a finished output is refused again, under it
                NEW                 `pipelines/outdir.atomic_output`: the job writes a temporary
                                    (`Claimed.into`), renamed (or uploaded, `_manifest.json` last) to the
                                    output when `run` returns, removed if it raises
    Ray         `ensure_ray`, for the jobs that use it (`Job.uses_ray`)
    tracking    the job's MLflow run (`pipelines/tracking.open_job_run`): created once, re-opened by a resume
    run         the job's own work (`Job.run`); if it raises, the MLflow run ends FAILED and `Job.failed`
                sees the output it had claimed

| job | output | Ray | MLflow |
|---|---|---|---|
| pretrain, finetune, sweep | JOB_DIR | yes | yes |
| shards build | RESUMABLE | yes | no |
| predict | NEW (local), RESUMABLE (object store) | yes | no |
| convert, tokenizer train, tokenizer from-vocab (`BuildJob`) | NEW | no | no |

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

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from bert import storage
from bert.errors import InputError
from pipelines.config_args import resolve_paths
from pipelines.outdir import (
    atomic_output,
    check_disjoint,
    check_new,
    check_unfinished,
    claim_dir,
)
from pipelines.tracking import (
    RunHandle,
    check_tracking_store,
    close_if_running,
    default_tracking_uri,
    finish_run,
    open_job_run,
)

C = TypeVar("C")

# What a job's output is (`Job.output`, or `Job.output_kind(config)` where it depends on the location)
JOB_DIR = "job dir"  # claimed, resumed; a finished run of the same settings is the result (pretrain, finetune, sweep)
RESUMABLE = "resumable"  # a one-piece output built in place: claimed, resumed; a finished one is refused
NEW = "new"  # a one-piece output built in a temporary and renamed (or uploaded) whole; an existing one is refused


@dataclass(frozen=True)
class Claimed(Generic[C]):
    """What a job holds while it runs: its settings (paths resolved), its output, its MLflow store and run."""

    config: C
    out: Path | str  # a URI string for an output on an object store
    tracking_uri: str | None  # None: the job logs nothing (`Job.logs`)
    run: RunHandle | None
    lease: Any = None  # pipelines.lease.S3Lease / LocalLease: `fence()` for the workers that commit into out
    into: Path | None = None  # NEW: the temporary the job writes, which becomes `out` when `run` returns
    resuming: bool = False  # JOB_DIR, RESUMABLE: `out` holds this job's unfinished run


class Job(Generic[C]):
    """The steps of one kind of job that differ from the others; `run_job` calls them in order."""

    name: ClassVar[str]  # the kind of output ("pretrain", "shards build"), and the prefix of every message
    required: ClassVar[tuple[str, ...]]  # config fields a run needs, e.g. ("shards", "out")
    paths: ClassVar[tuple[str, ...]]  # config fields holding paths, made absolute before anything else
    remote_out: ClassVar[bool] = True  # False: --out must be a local path (the job cannot write to a store yet)
    output: ClassVar[str] = JOB_DIR  # JOB_DIR, RESUMABLE or NEW (module docstring)
    out_flag: ClassVar[str] = "--out"  # how messages name the output
    uses_ray: ClassVar[bool] = True  # Ray is started (or joined) once the output is claimed
    logs: ClassVar[bool] = True  # MLflow: the tracking store is checked, the job's run opened (`run_name`)

    def output_kind(self, config: C) -> str:
        return self.output

    def path_fields(self, config: C) -> tuple[str, ...]:
        return self.paths

    def settle(self, config: C) -> None:
        """Checks of the settings that need the resolved paths (nothing read yet); none by default."""

    def finished(self, config: C) -> dict[str, Any] | None:
        """JOB_DIR: the result of a finished run of this job and settings in `config.out`, else None.

        A one-piece output that exists is refused: NEW, any entry at `out`; RESUMABLE, a finished one.
        """
        kind = self.output_kind(config)
        if kind == JOB_DIR:
            raise NotImplementedError
        (check_new if kind == NEW else check_unfinished)(config.out, self.name)  # type: ignore[attr-defined]
        return None

    def preflight(self, config: C) -> Any:
        """Every check that can be made before work starts; returns what the run needs from them."""
        raise NotImplementedError

    def identity(self, config: C) -> Mapping[str, Any]:
        """The settings that define the output: a re-run must match them to resume into the same dir."""
        return config.identity()  # type: ignore[attr-defined]

    def claim_identity(self, config: C, checked: Any) -> Mapping[str, Any]:
        """The identity the claim records (`_job.json`): `identity`, unless preflight learns more (shards build)."""
        return self.identity(config)

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

    def failed(self, claimed: Claimed[C], error: BaseException) -> None:
        """What to do with the claimed output when the run raised (before the error goes on); nothing by default."""



class BuildJob(Job[C]):
    """A NEW output built on this machine from its inputs (convert, tokenizer): no Ray, no MLflow, only --out resolved."""

    paths = ("out",)
    output = NEW
    uses_ray = False
    logs = False

def run_job(job: Job[C], config: C) -> dict[str, Any]:
    """required -> resolve -> disjoint -> finished? -> tracking store -> preflight -> claim -> Ray -> MLflow -> run."""
    config = _settled(job, config)
    out = _output(job, config.out)  # type: ignore[attr-defined]
    kind = job.output_kind(config)
    check_disjoint(out, job.inputs(config), job.out_flag)  # first: an output that is an input is refused as such
    done = job.finished(config)  # a one-piece output that exists: refused
    if done is not None:
        print(f"[{job.name}] {out} is complete; nothing to do", flush=True)
        if job.logs:
            close_if_running(out)  # a run killed between its last output and closing its MLflow run
        return done
    storage.check_bucket(out)  # a missing bucket, bad credentials, an unreachable store: one line, in seconds
    uri = None
    if job.logs:
        uri = config.tracking_uri or default_tracking_uri(out)  # type: ignore[attr-defined]
        check_tracking_store(uri)  # unusable: one line, before any input is read, anything written or Ray starts
    checked = job.preflight(config)
    with _claim(job, kind, Claimed(config, out, uri, None), checked) as claimed:
        return _run(job, claimed, checked)


def _settled(job: Job[C], config: C) -> C:
    """The config with every required setting present and its paths resolved, and its settling checks passed."""
    missing = [f"--{name.replace('_', '-')}" for name in job.required if not getattr(config, name)]
    if missing:
        names = missing[0] if len(missing) == 1 else f"{', '.join(missing[:-1])} and {missing[-1]}"
        raise InputError(f"{job.name}: {names} {'is' if len(missing) == 1 else 'are'} required")
    config = resolve_paths(config, job.path_fields(config))
    job.settle(config)
    return config


def _output(job: Job[Any], out: str) -> Path | str:
    """--out as the job uses it: a `Path`, or the URI string of an output on an object store."""
    if not storage.is_remote(out):
        return Path(out)
    if not job.remote_out:
        raise InputError(f"{job.name}: --out {out}: this job writes to a local path only for now; "
                         "give a local --out (nothing was written)")
    return out.rstrip("/")


@contextlib.contextmanager
def _claim(job: Job[C], kind: str, unclaimed: Claimed[C], checked: Any) -> Iterator[Claimed[C]]:
    """The output claimed by its kind (module docstring), for as long as the block runs."""
    config, out = unclaimed.config, unclaimed.out
    inputs = job.inputs(config)
    if kind == NEW:
        with atomic_output(out, job.name, inputs=inputs) as tmp:
            yield dataclasses.replace(unclaimed, into=tmp)
        return
    with claim_dir(out, job.name, job.claim_identity(config, checked), inputs) as (resuming, lease):
        if kind == RESUMABLE:
            job.finished(config)  # again, holding the claim: another run may have finished it meanwhile
        yield dataclasses.replace(unclaimed, lease=lease, resuming=resuming)


def _run(job: Job[C], claimed: Claimed[C], checked: Any) -> dict[str, Any]:
    """Ray (if the job uses it), the job's MLflow run (if it opens one), the job's work."""
    config, handle = claimed.config, None
    try:
        if job.uses_ray:
            from pipelines.ray_runtime import ensure_ray

            ensure_ray()  # the caller's runtime if there is one, else RAY_ADDRESS's cluster or a local one
        name = job.run_name(config) if job.logs else None
        if name is not None:
            handle = open_job_run(claimed.out, claimed.tracking_uri, config.experiment,  # type: ignore[attr-defined]
                                  run_name=name, parent_run_id=config.parent_run_id,  # type: ignore[attr-defined]
                                  tags=job.tags(config))
        return job.run(dataclasses.replace(claimed, run=handle), checked)
    except BaseException as exc:
        finish_run(handle, "FAILED")
        job.failed(claimed, exc)
        raise
