"""A fine-tune's output dir, written once training is over: each seed's (on its rank-0 worker) and, with
several seeds, the summary at the top (on the driver). See `pipelines/jobs/finetune.py`.

The dirs may be local or prefixes on an object store (`bert/storage.py`); either way metrics.json is
written last, behind the output's lease (`pipelines/lease.py`: `fence.commit`), and marks the output
complete. MLflow gets local copies of what it logs (its artifact store may itself be the object store).
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path
from typing import Any

from bert import storage
from bert.finetune import PREDICTIONS, FinetuneState, Prepared, aggregate, majority_baseline
from bert.tasks import get_task
from pipelines.jobs.configs import FinetuneConfig
from pipelines.jobs.launch import copy_checkpoint_out
from pipelines.tracking import MetricLogger, finish_run, fluent_tracking_uri

BEST = "_best"  # the best epoch's model so far, kept until the seed ends
EVAL_FILE = "eval.json"
METRICS = "metrics.json"


def write_seed_outputs(config: FinetuneConfig, prepared: Prepared, seed_dir: storage.Location, last: storage.Location,
                       handle, train_time: float, fence=None) -> dict[str, Any]:
    """The best epoch's model and predictions to their final names; metrics.json (every epoch) last."""
    state = FinetuneState.read(last)
    best_dir = storage.join(seed_dir, BEST, f"epoch-{state.best_epoch:03d}")
    best = storage.read_json(storage.join(best_dir, EVAL_FILE))
    checkpoint = copy_checkpoint_out(best_dir, storage.join(seed_dir, "checkpoint"), exclude=(EVAL_FILE, PREDICTIONS),
                                     link=True)  # _best goes
    _publish(storage.join(best_dir, PREDICTIONS), storage.join(seed_dir, PREDICTIONS))
    model_uri = _log_model(handle, storage.local_copy(checkpoint, "outputs")) \
        if (handle is not None and config.log_model) else None
    metrics = {
        "task": config.task, "seed": config.seed, "primary_metric": get_task(config.task).primary_metric,
        "metrics": best["metrics"], "best_epoch": best["epoch"], "best_step": best["step"], "history": state.history,
        "precision": state.precision, "majority_baseline": majority_baseline(get_task(config.task), prepared),
        "skipped": prepared.skipped, "num_train_examples": prepared.num_train_examples,
        "num_eval_examples": {split: len(ex) for split, ex in prepared.eval_examples.items()},
        "labels": list(prepared.labels), "max_seq_length": prepared.max_seq_length, "train_time_s": train_time,
        "config": config.to_dict(), "identity": config.identity(),
        "mlflow": dataclasses.asdict(handle) | {"model_uri": model_uri} if handle else None,
    }
    _commit(fence, storage.join(seed_dir, METRICS), metrics)
    if handle is not None:
        logger = MetricLogger(handle)
        logger.log_metrics({f"best/{k}": v for k, v in best["metrics"].items() if v is not None}
                           | {"best/epoch": best["epoch"]}, step=best["step"])
        logger.log_artifact(storage.local_copy(storage.join(seed_dir, METRICS), "outputs"))
        logger.log_artifact(storage.local_copy(storage.join(seed_dir, PREDICTIONS), "outputs"))
        logger.close()
    return metrics


def _publish(source: storage.Location, target: storage.Location) -> None:
    """Copy one file to its final name, where readers see it only complete."""
    if storage.is_remote(source) or storage.is_remote(target):
        storage.copy(source, target)  # one object: visible only once whole
        return
    tmp = Path(target).with_name(f".{Path(target).name}.tmp")
    shutil.copy2(source, tmp)
    tmp.replace(target)


def _commit(fence, location: storage.Location, data: dict[str, Any]) -> None:
    """Write the manifest that marks an output complete: behind the output's lease when there is one."""
    if fence is None:
        storage.write_json(location, data)
    else:
        fence.commit(location, data)


def _log_model(handle, checkpoint: Path) -> str | None:
    """Log the checkpoint as an `mlflow.pyfunc` model (signature, input example, pinned requirements:
    `pipelines/models.py`) into the seed's run; returns its URI (None on failure)."""
    import mlflow

    from pipelines.models import log_finetuned_model  # MLflow's model machinery: only when logging

    try:
        with fluent_tracking_uri(handle.tracking_uri), mlflow.start_run(run_id=handle.run_id):
            return log_finetuned_model(checkpoint)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail the job
        warnings.warn(f"could not log the pyfunc model to MLflow run {handle.run_id}: {exc}", stacklevel=2)
        return None


def summarize(config: FinetuneConfig, prepared: Prepared, runs: list[dict], parent, lease=None) -> dict[str, Any]:
    """Mean and std over seeds; the best seed's predictions and checkpoint at the top of the output dir."""
    out, spec = config.out, get_task(config.task)
    summary = aggregate(runs, spec.primary_metric)
    best_dir = storage.join(out, f"seed-{summary['best_seed']}")
    copy_checkpoint_out(storage.join(best_dir, "checkpoint"), storage.join(out, "checkpoint"))
    _publish(storage.join(best_dir, PREDICTIONS), storage.join(out, PREDICTIONS))
    result = {
        "task": config.task, "seeds": list(config.seed_list), "primary_metric": spec.primary_metric,
        "metrics": summary["mean"], "std": summary["std"], "best_seed": summary["best_seed"],
        "per_seed": {str(run["seed"]): run["metrics"] for run in runs}, "skipped": prepared.skipped,
        "num_train_examples": prepared.num_train_examples,
        "num_eval_examples": {split: len(ex) for split, ex in prepared.eval_examples.items()},
        "train_time_s": sum(run["train_time_s"] for run in runs),
        "outputs": "predictions.jsonl and checkpoint/ are the best seed's (highest primary metric)",
        "config": config.to_dict(), "identity": config.identity(),
        "mlflow": dataclasses.asdict(parent) if parent else None,
    }
    _commit(lease, storage.join(out, METRICS), result)
    if parent is not None:
        logger = MetricLogger(parent)
        logger.log_metrics({f"mean/{k}": v for k, v in summary["mean"].items()}
                           | {f"std/{k}": v for k, v in summary["std"].items()}, 0)
        logger.log_artifact(storage.local_copy(storage.join(out, METRICS), "outputs"))
        logger.close()
    finish_run(parent)
    return result


def describe(result: dict[str, Any]) -> str:
    primary = result["primary_metric"]
    value = result["metrics"].get(primary)
    if "std" in result:
        return (f"{result['task']}: {primary} {value:.4f} +- {result['std'].get(primary, 0.0):.4f} over seeds "
                f"{result['seeds']} (best seed {result['best_seed']})")
    shown = "n/a" if value is None else f"{value:.4f}"
    return f"{result['task']}: {primary} {shown} (best epoch {result['best_epoch']}, seed {result['seed']})"
