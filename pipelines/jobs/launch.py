"""What every Ray Train job shares: the launcher, the worker's view of the run, collectives, copying out.

    train_on_ray(loop, loop_config, ...)   one TorchTrainer (DDP over gloo or NCCL) with storage,
                                           failure and checkpoint policies; returns Ray's Result
    Worker.current()                       rank, world size, device, torch threads, from inside a worker
    record_worker(out, rank)               which process does rank r's work (`<out>/_workers/`)
    all_reduce_sum / all_min / any_rank / gather_to_rank0
                                           the collectives the jobs use (no-ops with one worker)
    restore_dir(storage, State)            the newest complete checkpoint to resume from (disk or Ray's record),
                                           on local disk (a checkpoint on an object store is downloaded first)
    agree_precision(...)                   the run's precision, the same on every rank
    report_checkpoint(...)                 metrics from every rank, a checkpoint from rank 0, moved into storage
    copy_checkpoint_out(src, dst)          a checkpoint's files to their final dir, atomically

`bert/` is single-device code; everything that knows about several workers is here.

Checkpoints on an object store (a job's `--out s3://...`). Ray Train gets the store as its storage
(`RunConfig(storage_path=..., storage_filesystem=...)`, the `pyarrow.fs` client of `bert/storage.py`,
so its own run state and its deletion of old checkpoints go there too), but the upload is bertflow's
(`checkpoint_upload_fn`), for two reasons. The checkpoint must be complete when Ray records it: Ray's
own upload copies a directory file by file, and a writer killed in the middle leaves a prefix that
looks like a checkpoint; ours uploads every file, then the run-state record (`bert/run_state.py`,
which lists every file and its size) last, so a prefix without a complete record is never restored.
And the record's upload is the commit that must be fenced (`pipelines/lease.py`): rank 0 checks the
job's lease just before it, so a worker of a run that lost its lease (its driver dead, a new run
started) cannot commit a checkpoint into the new run's output. Cost per checkpoint: one GET of the
lease and one small PUT beyond the files themselves (`benchmarks/storage.py`). A restarted worker
lists the prefix, takes the newest complete checkpoint and downloads it into the local cache
(`storage.local_copy`), from where it loads exactly as from disk (bit-exact resume).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert import storage as store
from bert.fsutil import atomic_directory
from bert.run_state import RunState


def train_on_ray(loop: Callable[[dict], None], loop_config: dict[str, Any], *, name: str, storage: store.Location,
                 num_workers: int | tuple[int, int], use_gpu: bool, cpus_per_worker: int, max_failures: int,
                 keep_checkpoints: int, placement_strategy: str = "PACK", callbacks: Sequence[Any] = ()) -> Any:
    """Run `loop(loop_config)` on `num_workers` DDP workers; checkpoints and Ray's run state under `storage/name`.

    A failed worker is replaced up to `max_failures` times; the replacement restarts from the
    latest checkpoint (the loop finds it). `num_workers=(min, max)`: an elastic worker group (Ray
    Train starts with as many as the cluster has room for, at least min; after a lost node it goes
    on with fewer, and grows back when room returns), each restart resuming from the latest checkpoint.
    `storage` may be a URI: Ray Train then stores there through the storage layer's client, and the
    workers get this process's store settings (`storage.environment()`: endpoint, region, keys).
    Returns Ray Train's `Result`.
    """
    import ray.train
    import ray.train.torch
    from ray.train.torch import TorchTrainer

    from pipelines.ray_runtime import ensure_ray

    ensure_ray()
    filesystem, path = store.resolve(storage)
    env = store.environment()  # the workers read and write the same store as this process
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            placement_strategy=placement_strategy,
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=None if filesystem is store.LOCAL else filesystem,
            worker_runtime_env={"env_vars": env} if env else None,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )
    return trainer.fit()


@dataclass(frozen=True)
class Worker:
    """This Ray Train worker: its rank, the world size and its device."""

    rank: int
    world: int
    device: Any  # torch.device

    @classmethod
    def current(cls, threads: int | None = None) -> Worker:
        """Call first thing in a training loop; sets torch's thread count (default: this node's cores / workers)."""
        import ray.train
        import ray.train.torch
        import torch

        ctx = ray.train.get_context()
        world = ctx.get_world_size()
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(ctx.get_local_world_size(), 1)))
        return cls(ctx.get_world_rank(), world, ray.train.torch.get_device())

    def prepare(self, model):
        """The model on this worker's device, wrapped for DDP when there are several workers; (model, raw model)."""
        import ray.train.torch

        model = ray.train.torch.prepare_model(model)
        return model, getattr(model, "module", model)


def record_worker(out: store.Location, rank: int) -> None:
    """`<out>/_workers/rank<r>.json`: which process and node does rank r's work (for operators and fault tests).

    Call first thing in a worker: for a local `out` it also marks the process as a writer of `out` for as
    long as it lives (`pipelines.outdir.hold_writer`), so a later run cannot claim `out` while this process
    may still write. (On an object store the lease's fence stands in: `report_checkpoint`.)
    """
    import ray

    from pipelines.outdir import hold_writer

    record = {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}
    if store.is_remote(out):
        store.write_json(store.join(out, "_workers", f"rank{rank}.json"), record)
        return
    from bert.fsutil import write_json_atomic

    hold_writer(out)
    (Path(out) / "_workers").mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out) / "_workers" / f"rank{rank}.json", record)


def all_reduce_sum(tensor, world: int):
    """Sum a CPU tensor over all ranks, in place (nothing to do with one worker)."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def all_min(value: float, world: int) -> float:
    """The minimum of `value` over all ranks (e.g. "every rank agrees": all_min(flag) == 1)."""
    if world == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def any_rank(flag: bool, world: int) -> bool:
    """True on every rank when `flag` is true on at least one (so all ranks take the same branch)."""
    return all_min(-float(flag), world) < 0


def gather_to_rank0(obj: Any, rank: int, world: int) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None on the others)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, obj)
    return parts if rank == 0 else None


def latest_checkpoint(storage: store.Location, state: type[RunState]) -> store.Location | None:
    """The newest complete checkpoint dir under `storage`, a local dir or a prefix on a store (names sort by
    step or epoch; a torn save is skipped)."""
    if not store.is_remote(storage):
        storage = Path(storage)
        return state.latest(sorted(p for p in storage.iterdir() if p.is_dir())) if storage.is_dir() else None
    if not store.is_dir(storage):
        return None
    names = [n for n in store.list_dir(storage) if store.is_dir(store.join(storage, n))]
    return state.latest(store.join(storage, n) for n in names)


def remove_torn_checkpoints(storage: store.Location, state: type[RunState]) -> list[str]:
    """Remove the checkpoint dirs under `storage` that are not complete (a killed save's files): on an object
    store only, where nothing else removes them. Call under the output's lease, before the workers start."""
    if not store.is_remote(storage) or not store.is_dir(storage):
        return []
    torn = [n for n in store.list_dir(storage) if store.is_dir(store.join(storage, n))
            and not state.complete(store.join(storage, n))]
    for name in torn:
        store.remove(store.join(storage, name))
    return torn


def restore_dir(storage: store.Location, state: type[RunState]) -> Path | None:
    """Where a (re)started worker resumes: the newest complete checkpoint under `storage`, or the one Ray Train
    recorded for this run when it lies there too (its record can lag the storage, and its storage may not be
    this node's disk); the later step wins. A checkpoint on an object store is downloaded into this node's
    cache (`storage.local_copy`) and returned there. None: start from scratch."""
    import ray.train

    candidates = [d for d in (latest_checkpoint(storage, state),) if d is not None]
    recorded = ray.train.get_checkpoint()  # the run's newest: with several seeds, maybe another seed's
    if recorded is not None:
        if store.is_remote(storage):
            root = store.resolve(storage)[1]
            path = os.fspath(storage).rstrip("/") + recorded.path[len(root):] \
                if recorded.path.rsplit("/", 1)[0] == root else None
        else:
            path = Path(recorded.path) if Path(recorded.path).parent.resolve() == Path(storage).resolve() else None
        if path is not None and state.complete(path):
            candidates.append(path)
    best = max(candidates, key=lambda d: state.read(d).step, default=None)
    return None if best is None else store.local_copy(best, "checkpoints")


def agree_precision(requested: str, worker: Worker, probe, previous: str | None):
    """The run's precision (`bert.precision.choose_precision`: kept on resume, probed with `auto`), and
    bf16 only if every rank chose it. A collective: every rank calls it."""
    from bert.precision import Precision, choose_precision

    chosen = choose_precision(requested, worker.device, probe, previous)
    agreed = all_min(float(chosen.name == "bf16"), worker.world)
    if chosen.name == "bf16" and agreed < 1:
        return Precision("fp32", chosen.device_type, "auto: another rank measured fp32 faster")
    return chosen


def report_checkpoint(metrics: dict[str, Any], rank: int, staging: Path | None, storage: store.Location, name: str,
                      write: Callable[[Path], Any], state: type[RunState] | None = None, fence=None) -> None:
    """Report `metrics` from every rank; rank 0 also a checkpoint, written by `write(dir)`, stored as `storage/name`.

    Local storage: the checkpoint is written in `staging` (under the job's output dir, never /tmp; None:
    `_tmp` beside `storage`) and
    renamed into Ray Train's storage dir (the same file system: no copy of the weights); a stale dir of
    the same name, left by a killed save, is replaced. Storage on an object store: written in a local
    temporary dir, then uploaded with `state`'s record (`state.STATE_FILE`) last, after `fence.check()`
    (see the module docstring). All ranks must call this together.
    """
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return

    def move(checkpoint, dir_name: str):
        target = storage / dir_name
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(checkpoint.path, target)
        except OSError:  # another file system: copy
            shutil.copytree(checkpoint.path, target)
        return ray.train.Checkpoint.from_directory(str(target))

    def upload(checkpoint, dir_name: str):
        target = store.join(storage, dir_name)
        store.remove(target)  # a killed save of the same name
        record = Path(checkpoint.path).parent / state.STATE_FILE
        os.replace(Path(checkpoint.path) / state.STATE_FILE, record)  # held back: uploaded last
        store.upload_dir(checkpoint.path, target)  # every other file, in parallel
        if fence is not None:
            fence.check()  # the commit: this run must still hold the output
        store.copy(record, store.join(target, state.STATE_FILE))
        filesystem, path = store.resolve(target)
        return ray.train.Checkpoint(path, filesystem=filesystem)

    remote = store.is_remote(storage)
    if remote and state is None:
        raise ValueError("report_checkpoint: a checkpoint on an object store needs its run-state class")
    if not remote:
        storage, staging = Path(storage), Path(staging or Path(storage).parent / "_tmp")
        staging.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=None if remote else staging, prefix="bertflow-checkpoint-") as tmp:
        directory = Path(tmp) / "checkpoint"
        directory.mkdir()
        write(directory)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                         checkpoint_dir_name=name, checkpoint_upload_fn=upload if remote else move)


def copy_checkpoint_out(src: store.Location, dst: store.Location, exclude: Iterable[str] = (),
                        link: bool = False) -> store.Location:
    """Copy the files of checkpoint dir `src` to `dst`, which appears only when complete (replacing an old one).

    `link`: hard-link instead where the file system allows (no bytes copied; for a `src` that is
    removed afterwards, so the two never share files for long). On an object store (either side) the
    files are copied one by one (server-side within one bucket) over a removed `dst`: there is no
    rename of a prefix, and `dst` counts as complete only once the output's manifest, written after
    it, exists (DESIGN.md, principle 11).
    """
    skip = set(exclude)
    if store.is_remote(src) or store.is_remote(dst):
        store.remove(dst)
        for rel, _ in store.walk_files(src):
            if "/" not in rel and rel not in skip:
                store.copy(store.join(src, rel), store.join(dst, rel))
        return dst
    with atomic_directory(dst) as tmp:
        for item in Path(src).iterdir():
            if item.is_file() and item.name not in skip:
                if link:
                    try:
                        os.link(item, tmp / item.name)
                        continue
                    except OSError:  # another file system, or no hard links there: copy
                        pass
                shutil.copy2(item, tmp / item.name)
    return dst
