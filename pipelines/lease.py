"""One writer per output on object storage: a lease object, `<output>/_lease.json` (DESIGN.md, principle 11).

There is no `flock` on S3, so the writer of an output holds a lease, an object it creates with a
conditional PUT and keeps fresh while it runs:

* **acquire**: `PUT _lease.json` with `If-None-Match: *` — S3 creates it only if no such object
  exists, atomically across all clients. If one exists, it is read: while it is live (not released,
  and the server's clock, the `Date` of the response, is before its `Last-Modified` + ttl + 1 s),
  the second writer is refused with a message naming the holder, having written nothing — unless
  the holder is a process of this very machine that no longer exists (a driver killed here: its
  pid is gone), whose lease is taken over at once, as the kernel frees a dead holder's flock. An expired
  or released lease is taken over with `If-Match: <its ETag>` and its generation + 1: of two
  writers racing for it, one PUT matches and the other gets 412 and is refused.
* **renew**: a background thread rewrites the lease every ttl / 4 with `If-Match` on the ETag it
  last wrote; a 412 means another writer took it over, and the lease is marked lost.
* **check (the fence)**: before each commit (a checkpoint's manifest, an output's `_manifest.json`),
  the writer calls `lease.check()`: it re-reads the lease object and refuses (`LeaseLost`) unless
  it still names this owner and generation, and unless the writer's own monotonic clock says the
  lease has at least ttl / 4 left since the start of its last successful renewal. `commit()` is
  check-then-write. The generation is the fencing token: it only ever grows. A process that
  commits for the holder (a Ray Train worker uploading a checkpoint) gets `lease.fence()`, a
  picklable (lease URI, owner, generation) whose `check()` reads the lease object and requires
  this owner and generation, live by the store's clock.
* **release**: the lease is rewritten as released (`If-Match`), not deleted, so generations
  never repeat and the next writer takes it over at once.

Why it is safe: creation and takeover are compare-and-swap operations on one object, which S3
(and moto, MinIO, R2) applies atomically, so at most one writer holds a given generation; expiry
is judged on the server's clock alone (Last-Modified and Date come from the store), so client
clocks may be wrong by any amount; a holder judges its own lease by a monotonic clock started
before its renewal request, so it believes the lease lives no longer than the store does
(bounded by clock *rate* drift, negligible over a minute).

What it cannot guarantee: S3 cannot make a write conditional on *another* object, so a writer
paused (GC, SIGSTOP, a frozen VM, a stalled upload) for longer than ttl / 4 between `check()` and
the PUT it guards can still land that PUT after its lease expired and was taken over. The new
holder then cleans unfinished outputs, and outputs are complete only when their manifest exists,
but a late manifest write from a paused old writer is not excluded. Keep ttl well above pauses
(default 60 s) and stage uploads before checking, so the guarded PUT is one small object.

A local path keeps the `flock` of pipelines/outdir.py (the kernel frees it when its holder
dies; no expiry needed): `acquire()` on a local path takes that lock, `.<name>.lock` beside the
output, the same file `atomic_output` locks, so do not nest the two on one output.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bert import storage
from bert.errors import BertflowError, InputError
from pipelines import signals

LEASE_FILE = "_lease.json"
FORMAT = "bertflow-lease/1"
DEFAULT_TTL_S = 60.0
log = logging.getLogger(__name__)
_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


class LeaseLost(BertflowError):
    """This writer's lease expired or was taken over: it must not commit anything more."""


def _client():
    """A boto3 S3 client, one per process and environment (boto3 reads AWS_ENDPOINT_URL(_S3), the region
    and the credentials from the environment itself)."""
    import boto3
    from botocore.config import Config

    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    with _clients_lock:
        if key not in _clients:
            _clients[key] = boto3.client("s3", config=Config(
                connect_timeout=storage.CONNECT_TIMEOUT_S, read_timeout=storage.REQUEST_TIMEOUT_S,
                retries={"max_attempts": storage.ATTEMPTS, "mode": "standard"}))
        return _clients[key]


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _conflict(exc: Exception) -> bool:
    """The conditional PUT lost: the object exists (If-None-Match) or changed (If-Match)."""
    return _code(exc) in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")



def _call(s3, uri: str, what: str, **kwargs) -> dict[str, Any]:
    """One S3 call on the lease object; a conflict or a missing object is raised as is, anything else as one line."""
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    try:
        return getattr(s3, what)(Bucket=bucket, Key=key, **kwargs)
    except Exception as exc:
        if _conflict(exc) or _code(exc) in ("NoSuchKey", "404"):
            raise
        raise InputError(f"{uri}: cannot {what.replace('_', ' ')}: {storage.explain(exc, uri)}") from None


def _read(s3, uri: str) -> tuple[dict[str, Any], str, bool] | None:
    """(lease, ETag, live) of the lease object now at `uri`, or None if there is none.

    Live: not released, and the store's clock (the response's Date) before Last-Modified + ttl + 1 s
    (both from the store, whose clock ticks in seconds), so no client clock is involved.
    """
    try:
        response = _call(s3, uri, "get_object")
    except Exception as exc:
        if _code(exc) in ("NoSuchKey", "404"):
            return None
        raise
    try:
        lease = json.loads(response["Body"].read())
    except json.JSONDecodeError:
        lease = {}  # not ours, or damaged: treated as expired, taken over like one
    server_now = email.utils.parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
    ttl = float(lease.get("ttl_s", DEFAULT_TTL_S))
    live = not lease.get("released", False) and (server_now - response["LastModified"]).total_seconds() < ttl + 1.0
    return lease, response["ETag"], live


def _holder_died_here(lease: dict[str, Any]) -> bool:
    """True when the lease names a process of this machine that no longer exists: a driver killed here, whose
    lease may be taken over at once instead of after its expiry (as the kernel frees a dead holder's flock).
    Its Ray workers may outlive it for a moment; the generation's fence stops any commit of theirs."""
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by another user
        return False
    return False


def holder(output_uri: str) -> str | None:
    """Who holds the live lease on the output at `output_uri` ("bertflow run, pid 123 on host, renewed ..."), or
    None when nobody does (no lease, released or expired)."""
    found = _read(_client(), f"{output_uri.rstrip('/')}/{LEASE_FILE}")
    if found is None or not found[2]:
        return None
    lease = found[0]
    return (f"{lease.get('job', 'a run')}, pid {lease.get('pid', '?')} on {lease.get('host', '?')}, "
            f"renewed {lease.get('written_at', '?')}")


@dataclass(frozen=True)
class Fence:
    """The fencing token of a held lease, for the processes that commit on its holder's behalf.

    The driver holds and renews the lease; a Ray Train worker that uploads a checkpoint gets
    `lease.fence()` (picklable) and calls `check()` before the PUT that publishes it: the lease
    object must still name this owner and generation and be live by the store's clock.
    """

    uri: str  # .../_lease.json; "" for a local output (the flock needs no fence)
    owner: str
    generation: int

    def check(self) -> None:
        if not self.uri:
            return
        found = _read(_client(), self.uri)
        if found is None or found[0].get("owner") != self.owner or found[0].get("generation") != self.generation \
                or not found[2]:
            now = f"generation {found[0].get('generation')}" if found else "no lease"
            raise LeaseLost(f"{self.uri}: generation {self.generation} no longer holds the output (now: {now}); "
                            "refusing to commit")

    def commit(self, location: storage.Location, data: Any) -> None:
        """Check the fence, then publish `data` as JSON at `location`."""
        self.check()
        storage.write_json(location, data)


class S3Lease:
    """The lease on one output on S3. Use through `acquire()`; `check()` before every commit."""

    def __init__(self, output_uri: str, job: str, ttl_s: float = DEFAULT_TTL_S):
        if ttl_s < 2:
            raise ValueError(f"lease ttl {ttl_s} s: at least 2 s (the store's clock ticks in seconds)")
        self.output, self.job, self.ttl_s = output_uri.rstrip("/"), job, float(ttl_s)
        self.uri = f"{self.output}/{LEASE_FILE}"
        self.owner = uuid.uuid4().hex
        self.generation = 0
        self.previous: dict[str, Any] | None = None  # the expired or released lease this one took over
        self._etag: str | None = None
        self._valid_until = 0.0  # monotonic
        self._lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._s3 = _client()

    def _call(self, what: str, **kwargs) -> dict[str, Any]:
        return _call(self._s3, self.uri, what, **kwargs)

    def _body(self, released: bool = False) -> bytes:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return json.dumps({"format": FORMAT, "owner": self.owner, "generation": self.generation, "job": self.job,
                           "host": socket.gethostname(), "pid": os.getpid(), "ttl_s": self.ttl_s,
                           "written_at": now, "released": released}, indent=2).encode()

    def _put(self, released: bool = False, **condition: str) -> None:
        started = time.monotonic()
        response = self._call("put_object", Body=self._body(released), ContentType="application/json", **condition)
        self._etag, self._valid_until = response["ETag"], started + self.ttl_s

    def _read(self) -> tuple[dict[str, Any], str, bool] | None:
        return _read(self._s3, self.uri)

    # -- the protocol

    def acquire(self) -> None:
        """Become the one writer, or raise InputError naming the live holder."""
        for _ in range(3):
            self.generation = 1
            try:
                self._put(IfNoneMatch="*")
                return
            except Exception as exc:
                if not _conflict(exc):
                    raise
            found = self._read()
            if found is None:
                continue  # released and deleted by hand in between: try to create it again
            lease, etag, live = found
            if live and not _holder_died_here(lease):
                raise self._refusal(lease)
            self.generation = int(lease.get("generation", 0)) + 1
            try:
                self._put(IfMatch=etag)
                self.previous = lease
                return
            except Exception as exc:
                if not _conflict(exc):
                    raise
        found = self._read()
        raise self._refusal(found[0] if found else {})

    def _refusal(self, lease: dict[str, Any]) -> InputError:
        who = f"{lease.get('job', 'a run')} (pid {lease.get('pid', '?')} on {lease.get('host', '?')}, " \
              f"generation {lease.get('generation', '?')}, renewed {lease.get('written_at', '?')})"
        return InputError(f"{self.output} is in use by another writer: {who} holds {LEASE_FILE}, live for up to "
                          f"{lease.get('ttl_s', DEFAULT_TTL_S):g} s after its last renewal; wait for it to finish, "
                          "or choose another output")

    def renew(self) -> None:
        try:
            self._put(IfMatch=self._etag)
        except Exception as exc:
            if _conflict(exc):
                self._lost = True
                raise LeaseLost(f"{self.uri}: taken over by another writer; generation {self.generation} ended") from None
            raise

    def check(self) -> None:
        """The fence: raise `LeaseLost` unless this writer still holds the lease, with time to spare."""
        left = self._valid_until - time.monotonic()
        if self._lost or left < self.ttl_s / 4:
            self._lost = True
            raise LeaseLost(f"{self.uri}: lease of generation {self.generation} lapsed (not renewed for "
                            f"{self.ttl_s - left:.0f} s of {self.ttl_s:g}); refusing to commit")
        found = self._read()
        if found is None or found[0].get("owner") != self.owner or found[0].get("generation") != self.generation:
            self._lost = True
            holder = found[0].get("generation") if found else "nobody"
            raise LeaseLost(f"{self.uri}: generation {self.generation} is no longer the holder (now: {holder}); "
                            "refusing to commit")

    def fence(self) -> Fence:
        return Fence(self.uri, self.owner, self.generation)

    def commit(self, location: storage.Location, data: Any) -> None:
        """Check the fence, then publish `data` as JSON at `location` (a manifest, written last)."""
        self.check()
        storage.write_json(location, data)

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except LeaseLost:
                log.error("%s: lease lost to another writer; this run's commits will be refused", self.uri)
                return
            except Exception as exc:  # transient: the next round tries again; check() sees the lapse
                log.warning("%s: lease renewal failed (%s); retrying", self.uri, exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._renew_forever, name=f"lease {self.uri}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and mark the lease released (if still ours), so the next writer need not wait."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._lost or self._etag is None:
            return
        with contextlib.suppress(Exception):  # a release that fails leaves a lease that expires by itself
            self._put(released=True, IfMatch=self._etag)


class LocalLease:
    """A local output's lock: `lock`'s flock, which cannot lapse while its holder lives."""

    generation = 0
    previous = None

    def __init__(self, output: Path):
        self.output = output

    def check(self) -> None:
        return None

    def fence(self) -> Fence:
        return Fence("", "", 0)

    def commit(self, location: storage.Location, data: Any) -> None:
        storage.write_json(location, data)


# ----------------------------------------------------------------------------- the local flock


def lock_holder(lock_file: Path) -> str | None:
    """Who holds `lock_file` ("pid 123 on host since ..."), or None if nobody does."""
    if not lock_file.is_file():
        return None
    with open(lock_file, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            return f.read().strip() or "another process"
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


@contextlib.contextmanager
def lock(lock_file: Path, what: str, *, wait: bool = False, hint: str = "", remove: bool = False,
         user: str = "run") -> Iterator[None]:
    """Hold an exclusive lock on `lock_file`; refuse at once (or wait, with `wait`) if another process holds it.

    `what` names the locked thing and `user` who holds it in the refusal ("/x/out is in use by
    another run (pid ...)").
    With `remove`, the lock file is deleted (while still held) when the block ends; a process
    that locked the deleted file meanwhile sees that it is no longer the file at that path and
    tries again, so two processes never both hold the lock.
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    f = None
    try:
        while f is None:
            with signals.deferred():  # a signal never lands between creating the lock file and the `try` that removes it
                f = _locked(lock_file, what, wait=wait, hint=hint, user=user)
                if f is not None:
                    f.seek(0)
                    f.truncate()
                    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                    f.flush()
            if f is None:
                time.sleep(0.2)  # waiting for the holder: here a signal stops the wait at once
        yield
    finally:
        if f is not None:
            with signals.deferred(), contextlib.suppress(OSError):
                try:
                    if remove:
                        lock_file.unlink()
                    else:
                        f.seek(0)
                        f.truncate()
                finally:
                    f.close()  # releases the lock


def _locked(lock_file: Path, what: str, *, wait: bool, hint: str, user: str):
    """`lock_file` opened and flocked (the file now at that path, not one its holder removed meanwhile); None
    while another process holds it and `wait`, else refused."""
    while True:
        f = open(lock_file, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.close()
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if wait:
                return None
            holder = lock_holder(lock_file) or "another process"
            raise InputError(f"{what} is in use by another {user} ({holder}){hint}") from None
        try:
            same = os.stat(lock_file).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return f
        f.close()  # the holder removed it as we locked it: lock the file now at that path


@contextlib.contextmanager
def acquire(output_uri: storage.Location, *, job: str = "run", ttl_s: float = DEFAULT_TTL_S) -> Iterator[S3Lease | LocalLease]:
    """Hold the one-writer lease on `output_uri` while the block runs; refuse (InputError) if another writer holds it."""
    local = storage.local_path(output_uri)
    if local is not None:
        local = local.absolute()
        with lock(local.parent / f".{local.name}.lock", str(local), remove=True,
                  hint="; wait for it to finish, or choose another output"):
            yield LocalLease(local)
        return
    if storage.scheme(output_uri) not in ("s3", "s3a"):
        raise InputError(f"{os.fspath(output_uri)}: one-writer leases exist for local paths and s3:// only "
                         "(GCS would need x-goog-if-generation-match); write this output to s3:// or a local path")
    lease = S3Lease(os.fspath(output_uri), job, ttl_s)
    lease.acquire()
    lease.start()
    try:
        yield lease
    finally:
        lease.release()


def clear_unfinished(lease: S3Lease | LocalLease, keep: tuple[str, ...] = ()) -> list[str]:
    """Remove what a killed writer left in the output (everything but the lease file and `keep`), under the fence."""
    lease.check()
    if not storage.exists(lease.output):
        return []
    removed = [name for name in storage.list_dir(lease.output) if name not in (LEASE_FILE, *keep)]
    for name in removed:
        storage.remove(storage.join(lease.output, name))
    return removed
