"""The `sweep` stage: `bertflow sweep` on one task as a node of a pipeline spec (pipelines/jobs/sweep.py).

    sweep_mrpc:
      kind: sweep
      inputs: {checkpoint: pretrain}     # or a `checkpoint` path (e.g. an imported Hugging Face dir)
      config:
        task: mrpc
        data: "${BERTFLOW_DATASETS}"      # a task dir or datasets root (or a path inside a `data` input)
        grid: paper                       # or space: {learning_rate: {loguniform: [1.0e-5, 1.0e-4]}, ...}
        scheduler: asha                   # and any other sweep option: num_samples, seeds: [1, 2, 3], ...
        max_train_examples: 2000          # and any fine-tune setting: the fixed part of every trial

A sweep stage is one DAG node for one task; a spec sweeps several tasks with one stage each.
`space` is a mapping inline or the path of a space file; either way it is parsed and checked when
the spec is loaded, and the parsed space enters the key, so editing the file re-runs the stage.
The key holds the task, the data and checkpoint (fingerprinted, or their upstream keys), the fixed
fine-tune settings that change results, the space, the search (scheduler, ASHA settings,
num_samples, search_seed) and the re-run seeds; not max_concurrent, trial_retries,
keep_trial_checkpoints, nor the fine-tune's speed and logging settings. The sweep runs in the
stable work dir `<key>.work/run` (a killed pipeline resumes it: finished trials are not trained
again) and publishes sweep.json, trials.csv, sweep.png and best/ (the best settings over the seeds).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bert import storage
from bert.errors import InputError
from pipelines.dag.graph import path_fingerprint, require_paths

SET_BY_PIPELINE = ("out", "tokenizer", "tracking_uri", "parent_run_id", "experiment")
OUTPUTS = ("sweep.json", "trials.csv", "sweep.png", "best")


@dataclass(frozen=True)
class SweepStageConfig:
    """The stage's own settings; the rest of its section goes to `SweepOptions` and `FinetuneConfig`."""

    task: str | None = None
    data: str | None = None  # a path, or a path inside the `data` input
    checkpoint: str | None = None  # a path, when there is no `checkpoint` input
    space: dict[str, Any] | str | None = None  # inline, or a space file
    grid: str | None = None
    seeds: tuple[int, ...] | str | None = (1, 2, 3)  # the best settings' re-runs; none: no re-run


@dataclass(frozen=True)
class SweepNode:
    base: Any  # FinetuneConfig without paths (set when it runs)
    options: Any  # SweepOptions
    space: dict[str, Any]  # the parsed space (sweep_space.Space)
    data: str | None
    data_is_input: bool
    checkpoint: str | None


def configure_sweep(w) -> list:
    """Parse and check the section once (space included) into one node; its key fields."""
    from pipelines.config_args import construct, split_section
    from pipelines.dag.spec import expand_path
    from pipelines.jobs.configs import FinetuneConfig
    from pipelines.jobs.sweep_space import (
        GRIDS,
        SweepOptions,
        expand,
        load_space_file,
        parse_space,
        sweep_identity,
    )

    own, option_values, finetune_values = split_section(w.spec.config, [SweepStageConfig, SweepOptions, FinetuneConfig],
                                                        w.text, excluded=SET_BY_PIPELINE)
    section = SweepStageConfig(**own)
    if not section.task:
        raise InputError(f"{w.text}: task is missing: name the task to sweep, e.g. task: mrpc")
    checkpoint, data, data_is_input = _model_and_data(w, section)
    base = construct(FinetuneConfig, {"task": section.task, **finetune_values}, w.text)
    _check_task(section.task, w.text)
    seeds = section.seeds if isinstance(section.seeds, str) or section.seeds is None else ",".join(map(str, section.seeds))
    where = f"{w.text}.space"
    options = construct(SweepOptions, {**option_values, "grid": section.grid, "seeds": seeds,
                                               "space": None if section.space is None else where}, w.text)
    if section.grid is not None:
        space = GRIDS[section.grid]
    elif isinstance(section.space, str):
        space = load_space_file(expand_path(section.space), base)
    else:
        space = parse_space(section.space, where, base)
    for plan in expand(space, options.num_samples, options.search_seed):
        construct(FinetuneConfig, {**dataclasses.asdict(base), **plan["settings"]}, f"{where} ({plan['name']})")
    identity = sweep_identity(base, options, space)
    fields = {k: v for k, v in identity.items() if k != "finetune"}
    fields |= {"finetune": {k: v for k, v in identity["finetune"].items()
                            if k not in SET_BY_PIPELINE + ("data", "checkpoint")}}  # run-only ones: not in identity
    fields |= {"data": {"input": data}} if data_is_input else {"data": data, "files": path_fingerprint([data])}
    if checkpoint:
        fields |= {"checkpoint": checkpoint, "checkpoint_files": path_fingerprint([checkpoint])}
    return [w.stage(SweepNode(base, options, space, data, data_is_input, checkpoint), fields)]


def _model_and_data(w, section: SweepStageConfig) -> tuple[str | None, str | None, bool]:
    """The checkpoint path (None: the `checkpoint` input) and the data path (inside the `data` input or not)."""
    from pipelines.dag.spec import expand_path

    checkpoint = expand_path(section.checkpoint) if section.checkpoint else None
    if ("checkpoint" in w.inputs) == (checkpoint is not None):
        raise InputError(f"{w.text}: give the model either as input `checkpoint` (a pretrain stage) or as a "
                         "`checkpoint` path (e.g. an imported Hugging Face dir), exactly one")
    data_is_input = "data" in w.inputs
    if section.data is None and not data_is_input:
        raise InputError(f"{w.text}: no data: set `data` (a task dir or datasets root) or give the stage a "
                         "`data` input")
    data = section.data if data_is_input else expand_path(section.data)
    require_paths([p for p in (checkpoint, None if data_is_input else data) if p], w.text)
    return checkpoint, data, data_is_input


def _check_task(task: str, where: str) -> None:
    from bert.tasks import get_task

    try:
        get_task(task)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def sweep_stage(ctx) -> dict[str, Any]:
    """Run the sweep in `<key>.work/run` (resumable), publish its summary and best/ (`ctx.adopt`: hard links on a
    local disk, server-side copies on an object store)."""
    from pipelines.jobs.sweep import run_sweep

    node: SweepNode = ctx.config
    checkpoint = str(ctx.inputs["checkpoint"] / "checkpoint") if "checkpoint" in ctx.inputs else node.checkpoint
    data = str(ctx.inputs["data"] / (node.data or "")) if node.data_is_input else node.data
    run_dir = storage.join(ctx.work, "run")
    base = dataclasses.replace(node.base, data=data, checkpoint=checkpoint, out=str(run_dir), **ctx.job_tracking())
    result = run_sweep(base, node.options, node.space)
    for name in OUTPUTS:
        if storage.exists(storage.join(run_dir, name)):
            ctx.adopt(storage.join(run_dir, name), name)
    metric, best = result["primary_metric"], result["best"]
    metrics = {f"best/{metric}": best["metric"]}
    if result["rerun"]:
        metrics |= {f"rerun/mean/{metric}": result["rerun"]["mean"].get(metric),
                    f"rerun/std/{metric}": result["rerun"]["std"].get(metric, 0.0)}
    ctx.log(f"best {best['trial']} {best['settings']}: {metric} {best['metric']:.4f}")
    return {"task": result["task"], "primary_metric": metric, "best_trial": best["trial"],
            "best_settings": best["settings"], "metrics": metrics, "mlflow": result.get("mlflow"),
            "trial_epochs": result["compute"]["trial_epochs"], "stopped_early": result["compute"]["stopped_early"]}
