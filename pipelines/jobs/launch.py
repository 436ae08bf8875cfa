"""What every Ray Train job shares: the launcher, the worker's view of the run, collectives, copying out.

    train_on_ray(loop, loop_config, ...)   one TorchTrainer (DDP over gloo or NCCL) with storage,
                                           failure and checkpoint policies; returns Ray's Result
    Worker.current()                       rank, world size, device, torch threads, from inside a worker
    record_worker(out, rank)               which process does rank r's work (`<out>/_workers/`)
    all_reduce_sum / all_min / any_rank / gather_to_rank0
                                           the collectives the jobs use (no-ops with one worker)
    restore_dir(storage, State)            the newest complete checkpoint to resume from (disk or Ray's record)
    agree_precision(...)                   the run's precision, the same on every rank
    report_checkpoint(...)                 metrics from every rank, a checkpoint from rank 0, moved into storage
    copy_checkpoint_out(src, dst)          a checkpoint's files to their final dir, atomically

`bert/` is single-device code; everything that knows about several workers is here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert.fsutil import atomic_directory
from bert.run_state import RunState


def train_on_ray(loop: Callable[[dict], None], loop_config: dict[str, Any], *, name: str, storage: Path,
                 num_workers: int | tuple[int, int], use_gpu: bool, cpus_per_worker: int, max_failures: int,
                 keep_checkpoints: int, placement_strategy: str = "PACK", callbacks: Sequence[Any] = ()) -> Any:
    """Run `loop(loop_config)` on `num_workers` DDP workers; checkpoints and Ray's run state under `storage/name`.

    A failed worker is replaced up to `max_failures` times; the replacement restarts from the
    latest checkpoint (the loop finds it). `num_workers=(min, max)`: an elastic worker group (Ray
    Train starts with as many as the cluster has room for, at least min; after a lost node it goes
    on with fewer, and grows back when room returns), each restart resuming from the latest checkpoint.
    Returns Ray Train's `Result`.
    """
    import ray.train
    import ray.train.torch
    from ray.train.torch import TorchTrainer

    from pipelines.ray_runtime import ensure_ray

    ensure_ray()
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
            storage_path=str(storage),
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


def record_worker(out: Path, rank: int) -> None:
    """`<out>/_workers/rank<r>.json`: which process and node does rank r's work (for operators and fault tests).

    Call first thing in a worker: it also marks the process as a writer of `out` for as long as it lives
    (`pipelines.outdir.hold_writer`), so a later run cannot claim `out` while this process may still write.
    """
    import ray

    from bert.fsutil import write_json_atomic
    from pipelines.outdir import hold_writer

    hold_writer(out)
    (out / "_workers").mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "_workers" / f"rank{rank}.json",
                      {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()})


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


def latest_checkpoint(storage: Path, state: type[RunState]) -> Path | None:
    """The newest complete checkpoint dir under `storage` (names sort by step or epoch; a torn save is skipped)."""
    return state.latest(sorted(p for p in storage.iterdir() if p.is_dir())) if storage.is_dir() else None


def restore_dir(storage: Path, state: type[RunState]) -> Path | None:
    """Where a (re)started worker resumes: the newest complete checkpoint under `storage` on disk, or the one
    Ray Train recorded for this run when it lies there too (its record can lag the disk, and its storage
    may not be this node's disk); the later step wins. None: start from scratch."""
    import ray.train

    candidates = [d for d in (latest_checkpoint(storage, state),) if d is not None]
    recorded = ray.train.get_checkpoint()  # the run's newest: with several seeds, maybe another seed's
    if recorded is not None:
        path = Path(recorded.path)
        if path.parent.resolve() == storage.resolve() and state.complete(path):
            candidates.append(path)
    return max(candidates, key=lambda d: state.read(d).step, default=None)


def agree_precision(requested: str, worker: Worker, probe, previous: str | None):
    """The run's precision (`bert.precision.choose_precision`: kept on resume, probed with `auto`), and
    bf16 only if every rank chose it. A collective: every rank calls it."""
    from bert.precision import Precision, choose_precision

    chosen = choose_precision(requested, worker.device, probe, previous)
    agreed = all_min(float(chosen.name == "bf16"), worker.world)
    if chosen.name == "bf16" and agreed < 1:
        return Precision("fp32", chosen.device_type, "auto: another rank measured fp32 faster")
    return chosen


def report_checkpoint(metrics: dict[str, Any], rank: int, staging: Path, storage: Path, name: str,
                      write: Callable[[Path], Any]) -> None:
    """Report `metrics` from every rank; rank 0 also a checkpoint, written by `write(dir)`, stored as `storage/name`.

    The checkpoint is written in `staging` (under the job's output dir, never /tmp) and renamed
    into Ray Train's storage dir (the same file system: no copy of the weights); a stale dir of
    the same name, left by a killed save, is replaced. All ranks must call this together.
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

    staging.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=staging) as tmp:
        directory = Path(tmp) / "checkpoint"
        directory.mkdir()
        write(directory)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                         checkpoint_dir_name=name, checkpoint_upload_fn=move)


def copy_checkpoint_out(src: Path, dst: Path, exclude: Iterable[str] = (), link: bool = False) -> Path:
    """Copy the files of checkpoint dir `src` to `dst`, which appears only when complete (replacing an old one).

    `link`: hard-link instead where the file system allows (no bytes copied; for a `src` that is
    removed afterwards, so the two never share files for long).
    """
    skip = set(exclude)
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
