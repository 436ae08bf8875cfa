"""Output dirs: the rule every command that writes obeys (DESIGN.md, principle 10).

A command writes only into its own output, checked before any work starts:

* **A job dir** (`bertflow pretrain`, `finetune`, `sweep`): `own_dir(out, job, identity)`.
  `out` must be absent (or empty), or hold `_job.json` written by the same job with the same
  identity (the settings that define its output): an unfinished run to resume, or a finished
  one the job will find done. Anything else — another job's output, the same job with other
  settings, files bertflow did not write — is refused with a message naming the folder and
  what it holds, and nothing is touched.
* **A one-piece output** (`convert`, `tokenizer`, `predict --out` on a local path):
  `atomic_output(out, job)`. `out` must not exist. The output is built in a temporary sibling
  `.<name>.tmp-<id>` and renamed to `out` only when complete; a failure removes it.
  One built in place (`shards build`, `predict --out` on an object store) is claimed as a job dir, which
  resumes its own unfinished run; a finished one is refused (`check_unfinished`).
Which rule a job follows, and when, is `pipelines/jobs/skeleton.run_job`'s business (`Job.output`).

Either way the output is locked while the command runs: `<out>/.lock` for a job dir,
`.<name>.lock` beside a one-piece output. The lock is an `fcntl.flock`, which the kernel
releases when its holder dies, so a killed run's lock is simply taken by the next run; the
file records who holds it, for the refusal message. Under the lock, temporaries a killed run
left behind (`.<name>.tmp-*`) are removed. `bertflow run` locks its workdir the same way
(`lock`).

No writer outlives its lock. The driver holds `.lock`, but the Ray workers that write a job
dir are other processes, which may go on for a moment after the driver dies (a Ray runtime
notices a dead driver and kills its workers about a second later). So every process that writes
into a job dir holds a shared `flock` on `<out>/.writers` for as long as it lives
(`hold_writer`, called by each worker first thing), and a claim (`own_dir`) takes that file
exclusively once before it goes on: it waits until every writer of an earlier run has exited
(up to `WRITERS_WAIT_S`, then refuses, naming them). A late write therefore lands before the
next run starts, never during it. (POSIX file locks on one machine, or NFS with lockd; on
object storage the equivalent is a lease with a fencing generation, `pipelines/lease.py`.)

Inputs and outputs may not coincide: `check_disjoint` refuses an output that is an input, or
lies inside one, or contains one.

**On an object store** (`--out s3://...`, DESIGN.md principle 11) there is no flock and no rename:
a job dir is claimed by the output's lease (`pipelines/lease.py`: a conditional PUT, renewed while
the job runs, refused to a second writer), `_job.json` is read and written through `bert/storage.py`
under it, and the lease's fence stands in for `.writers`: a worker of an earlier run commits nothing
(a checkpoint's record, a manifest) once a later run holds the lease. A one-piece output is built in
a local temporary dir and uploaded, `_manifest.json` last (written by the command, or by
`atomic_output` listing the files and their sizes): the output exists only once its manifest does,
and objects a killed upload left under the prefix are removed by the next writer, under the lease.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from bert import storage
from bert.errors import InputError
from bert.fsutil import write_json_atomic
from pipelines import signals
from pipelines.lease import LEASE_FILE, LocalLease, acquire, clear_unfinished, lock, lock_holder  # noqa: F401 (the flock lives there)

JOB_FILE = "_job.json"
MANIFEST = "_manifest.json"  # written last into a one-piece output on an object store (and by some commands)
LOCK_FILE = ".lock"
WRITERS_FILE = ".writers"
WRITERS_WAIT_S = 120.0  # how long a claim waits for the processes of an earlier run to exit

_writer_files: dict[str, Any] = {}  # out dir -> the descriptor of `.writers` this process holds (until it exits)


# ----------------------------------------------------------------------------- locks


# ----------------------------------------------------------------------------- what a folder holds


def describe(path: Path) -> str:
    """A short account of what an existing folder (or file) holds, for refusal messages."""
    if path.is_file():
        return f"a file of {path.stat().st_size:,} bytes"
    job_file = path / JOB_FILE
    if job_file.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            job = json.loads(job_file.read_text())
            return f"a bertflow {job.get('job', '?')} run ({JOB_FILE})"
    markers = (
        ("_manifest.json", "a finished bertflow output (_manifest.json)"),
        ("metrics.json", "a fine-tune output (metrics.json)"),
        ("model.safetensors", "a checkpoint (model.safetensors)"),
        ("pytorch_model.bin", "a checkpoint (pytorch_model.bin)"),
        ("tokenizer_config.json", "a tokenizer (tokenizer_config.json)"),
        ("mlflow.db", "an MLflow store (mlflow.db)"),
    )
    for name, text in markers:
        if (path / name).exists():
            return text
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'} ({shown})"


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(p.name not in (LOCK_FILE, WRITERS_FILE) for p in path.iterdir())


# ----------------------------------------------------------------------------- inputs vs outputs


def check_disjoint(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None], flag: str = "--out") -> None:
    """Refuse an output that is one of the inputs, lies inside one, or contains one."""
    for item in inputs:
        if item is None:
            continue
        target, source = _where(out), _where(item)
        if target == source:
            raise InputError(f"{flag} {out} is also an input: choose an output path that is not {item}")
        if target.startswith(source.rstrip("/") + "/"):
            raise InputError(f"{flag} {out} lies inside the input {item}: a command never writes next to its inputs")
        if source.startswith(target.rstrip("/") + "/"):
            raise InputError(f"{flag} {out} contains the input {item}: choose an output outside it")


def _where(location: str | os.PathLike[str]) -> str:
    """A location as one comparable string: a local path resolved, a URI without its trailing slash."""
    if storage.is_remote(location):
        return os.fspath(location).rstrip("/")
    return str(storage.local_path(location).resolve())


# ----------------------------------------------------------------------------- job dirs


def identity_digest(identity: Mapping[str, Any]) -> str:
    payload = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _identity_differences(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(mine) | set(theirs))
    return [f"{k}: {theirs.get(k, '(unset)')!r} there, {mine.get(k, '(unset)')!r} now"
            for k in keys if json.dumps(mine.get(k), default=str) != json.dumps(theirs.get(k), default=str)]


def check_job_dir(out: Path, job: str, identity: Mapping[str, Any]) -> bool:
    """Refuse `out` unless it is absent, empty, or a run of `job` with `identity`. True if it is such a run."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise InputError(f"{out} is a file, not an output dir; choose another --out")
    job_file = out / JOB_FILE
    if not job_file.is_file():
        if _is_empty_dir(out):
            return False
        raise InputError(f"{out} already holds {describe(out)}, not written by `bertflow {job}`; "
                         "refusing to write into it: choose another --out (nothing was changed)")
    try:
        recorded = json.loads(job_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{job_file}: unreadable ({exc}); refusing to write into {out}") from None
    return _same_job(out, job, identity, recorded)


def _same_job(out: Any, job: str, identity: Mapping[str, Any], recorded: Mapping[str, Any]) -> bool:
    """Refuse unless the `_job.json` found in `out` records `job` with `identity`; True."""
    if recorded.get("job") != job:
        raise InputError(f"{out} holds a `bertflow {recorded.get('job')}` run, not a `bertflow {job}` run; "
                         "choose another --out (nothing was changed)")
    if recorded.get("identity_sha256") != identity_digest(identity):
        changes = "; ".join(_identity_differences(identity, recorded.get("identity", {}))[:6]) or f"see {JOB_FILE}"
        raise InputError(f"{out} holds a `bertflow {job}` run with other settings ({changes}); re-run with the "
                         "same settings to resume it, or choose another --out (nothing was changed)")
    return True


def check_remote_job_dir(out: str, job: str, identity: Mapping[str, Any]) -> bool:
    """`check_job_dir` for a prefix on an object store (its bucket must exist)."""
    storage.check_bucket(out)
    names = [n for n in (storage.list_dir(out) if storage.is_dir(out) else []) if n != LEASE_FILE]
    if not names:
        return False
    if JOB_FILE not in names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise InputError(f"{out} already holds {len(names)} entr{'y' if len(names) == 1 else 'ies'} ({shown}), not "
                         f"written by `bertflow {job}`; refusing to write into it: choose another --out "
                         "(nothing was changed)")
    return _same_job(out, job, identity, storage.read_json(storage.join(out, JOB_FILE)))


def _job_record(job: str, identity: Mapping[str, Any]) -> dict[str, Any]:
    return {"job": job, "identity": dict(identity), "identity_sha256": identity_digest(identity),
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}


@contextlib.contextmanager
def own_dir(out: str | os.PathLike[str], job: str, identity: Mapping[str, Any],
            inputs: Iterable[str | os.PathLike[str] | None] = ()) -> Iterator[bool]:
    """Claim the job dir `out` for `job` (see the module docstring) and lock it; yields True when resuming.

    Everything is checked before the dir is created or touched.
    """
    with claim_dir(out, job, identity, inputs) as (resuming, _):
        yield resuming


@contextlib.contextmanager
def claim_dir(out: str | os.PathLike[str], job: str, identity: Mapping[str, Any],
              inputs: Iterable[str | os.PathLike[str] | None] = ()) -> Iterator[tuple[bool, Any]]:
    """`own_dir`, yielding (resuming, the output's lease): a local dir's flock (`LocalLease`), or on an object
    store the `S3Lease` whose `fence()` the job hands to the processes that commit into `out`."""
    check_disjoint(out, inputs)
    if storage.is_remote(out):
        out = os.fspath(out).rstrip("/")
        check_remote_job_dir(out, job, identity)
        with acquire(out, job=job) as lease:
            resuming = check_remote_job_dir(out, job, identity)  # again, under the lease
            if not resuming:
                lease.commit(storage.join(out, JOB_FILE), _job_record(job, identity))
            yield resuming, lease
        return
    out = Path(out)
    check_job_dir(out, job, identity)
    out.mkdir(parents=True, exist_ok=True)
    with lock(out / LOCK_FILE, str(out), hint="; wait for it to finish, or choose another --out"):
        resuming = check_job_dir(out, job, identity)  # again, under the lock: another run may have claimed it
        if not resuming:
            write_json_atomic(out / JOB_FILE, _job_record(job, identity))
        wait_for_earlier_writers(out)
        remove_temporaries(out)
        yield resuming, LocalLease(out)


def hold_writer(out: str | os.PathLike[str]) -> None:
    """Mark this process as a writer of job dir `out` until it exits (a shared lock the kernel drops then)."""
    key = str(Path(out).resolve())
    if key in _writer_files:
        return
    Path(key).mkdir(parents=True, exist_ok=True)
    # a bare descriptor, not a file object: the interpreter's shutdown never closes it, so the kernel drops
    # the lock only when the process has exited, not while it is still shutting down
    fd = os.open(Path(key) / WRITERS_FILE, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a new claim checks for an earlier run's writers
    _writer_files[key] = fd


def wait_for_earlier_writers(out: Path, timeout: float = WRITERS_WAIT_S) -> None:
    """Return once no process of an earlier run holds `<out>/.writers` (call under the dir's lock)."""
    deadline = time.monotonic() + timeout
    with open(out / WRITERS_FILE, "a+") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise InputError(f"{out}: processes of an earlier run still write into it after {timeout:.0f} s "
                                     f"({_writer_processes(out)}); stop them (or the Ray cluster they run on) and "
                                     "run again") from None
                time.sleep(0.2)
                continue
            fcntl.flock(f, fcntl.LOCK_UN)
            return


def _writer_processes(out: Path) -> str:
    """The worker processes recorded under `<out>/_workers/` (pipelines.jobs.launch.record_worker)."""
    found = []
    for record in sorted((out / "_workers").glob("rank*.json")):
        with contextlib.suppress(OSError, ValueError):
            found.append(f"{record.stem} pid {json.loads(record.read_text()).get('pid')}")
    return ", ".join(found) or "see `fuser` on " + str(out / WRITERS_FILE)


def remove_temporaries(directory: Path) -> list[Path]:
    """Remove `.*.tmp-*` / `.*.old-*` entries a killed run left in `directory` (call under its lock)."""
    removed = []
    for item in directory.iterdir() if directory.is_dir() else ():
        if item.name.startswith(".") and (".tmp-" in item.name or ".old-" in item.name):
            (shutil.rmtree if item.is_dir() and not item.is_symlink() else Path.unlink)(item)
            removed.append(item)
    return removed


# ----------------------------------------------------------------------------- one-piece outputs


def check_new_output(out: Path, job: str) -> None:
    if out.exists() or out.is_symlink():
        raise InputError(f"{out} already exists and holds {describe(out) if out.exists() else 'a dangling link'}; "
                         f"`bertflow {job}` writes only a new output: choose another path (nothing was changed)")


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike[str], job: str, *, directory: bool = True,
                  inputs: Iterable[str | os.PathLike[str] | None] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of the new output `out` (a dir, or a file path with `directory=False`).

    Renamed to `out` when the block finishes; removed if it raises. `out` must not exist. On an object
    store: a local temporary, uploaded when the block finishes (see the module docstring).
    """
    if storage.is_remote(out):
        with _atomic_remote_output(os.fspath(out).rstrip("/"), job, directory, inputs) as tmp:
            yield tmp
        return
    out = Path(out)
    check_disjoint(out, inputs, "output")
    check_new_output(out, job)
    out.parent.mkdir(parents=True, exist_ok=True)
    with lock(out.parent / f".{out.name}.lock", str(out), hint="; wait for it to finish, or choose another path",
              remove=True):
        check_new_output(out, job)
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # a killed run's leftovers
            (shutil.rmtree if stale.is_dir() else Path.unlink)(stale)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with signals.deferred():  # never a temporary without the `try` that removes it
                if directory:
                    tmp.mkdir()
            yield tmp
            with signals.deferred(commit=True):  # once renamed, the work is done: a later signal is only noted
                check_new_output(out, job)
                os.replace(tmp, out)
        except BaseException:
            with signals.deferred():
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
            raise


def check_new(out: str | os.PathLike[str], job: str) -> None:
    """Refuse an existing one-piece output, local or on an object store, before any input is read."""
    if storage.is_remote(out):
        check_new_remote_output(os.fspath(out).rstrip("/"), job)
    else:
        check_new_output(Path(out), job)


def check_unfinished(out: str | os.PathLike[str], job: str) -> None:
    """Refuse a finished one-piece output that a job builds in place (`shards build`): a file, or a dir or prefix
    holding `_manifest.json`, even of the same settings; the job resumes only its own unfinished run
    (`claim_dir` refuses everything else, naming what it holds)."""
    out = os.fspath(out).rstrip("/") if storage.is_remote(out) else out
    if storage.is_file(out) or storage.is_file(storage.join(out, MANIFEST)):
        what = "a file" if storage.is_file(out) else f"a finished `bertflow {job}` output ({MANIFEST})"
        raise InputError(f"{out} already exists and holds {what}; `bertflow {job}` writes only a new output or "
                         "resumes its own unfinished run: choose another path (nothing was changed)")


def check_new_remote_output(out: str, job: str) -> bool:
    """Refuse a URI that holds a complete output (its manifest, or an object of that name); True when it
    holds objects a killed writer left (no manifest), which the next writer removes under the lease."""
    storage.check_bucket(out)
    if storage.is_file(out) or storage.is_file(storage.join(out, MANIFEST)):
        what = "an object" if storage.is_file(out) else f"a finished output ({MANIFEST})"
        raise InputError(f"{out} already exists and holds {what}; `bertflow {job}` writes only a new output: "
                         "choose another path (nothing was changed)")
    return storage.is_dir(out) and any(n != LEASE_FILE for n in storage.list_dir(out))


@contextlib.contextmanager
def _atomic_remote_output(out: str, job: str, directory: bool,
                          inputs: Iterable[str | os.PathLike[str] | None]) -> Iterator[Path]:
    """`atomic_output` on an object store: built locally, uploaded under the output's lease, manifest last.

    A single file (`directory=False`) is one PUT, visible only whole; two writers racing for one file
    name both succeed and the later one's file stays (S3's conditional create is not reached through
    pyarrow): a dir output is claimed by its lease, a file output is not.
    """
    check_disjoint(out, inputs, "output")
    check_new_remote_output(out, job)
    with contextlib.ExitStack() as stack:
        spool = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bertflow-output-")))
        if not directory:
            yield spool / storage.name(out)
            check_new_remote_output(out, job)
            storage.copy(spool / storage.name(out), out)
            return
        lease = stack.enter_context(acquire(out, job=job))
        if check_new_remote_output(out, job):  # again, under the lease
            removed = clear_unfinished(lease)
            print(f"[{job}] removed {len(removed)} unfinished object(s) a killed run left in {out}", flush=True)
        tmp = spool / "out"
        tmp.mkdir()
        yield tmp
        files = {rel: size for rel, size in storage.walk_files(tmp) if rel != MANIFEST}
        for rel in sorted(files):
            storage.copy(tmp / rel, storage.join(out, rel))
        if (tmp / MANIFEST).is_file():  # the command's own manifest, byte for byte
            lease.check()
            storage.copy(tmp / MANIFEST, storage.join(out, MANIFEST))  # written last: the output now exists
        else:
            lease.commit(storage.join(out, MANIFEST), {"job": job, "files": files,
                                                       "written": time.strftime("%Y-%m-%d %H:%M:%S")})
