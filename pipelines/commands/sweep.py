"""`bertflow sweep`: a hyper-parameter search over fine-tune settings on Ray Tune (pipelines/jobs/sweep.py).

Every `bertflow finetune` option is the fixed part of each trial's configuration (generated from
`FinetuneConfig`, as `bertflow finetune` does); the sweep's own options come from `SweepOptions`.
`--seeds` names the seeds of the best configuration's re-runs (each trial trains with `--seed`).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from pipelines.config_args import add_dataclass_arguments
    from pipelines.jobs.configs import FinetuneConfig
    from pipelines.jobs.sweep_space import SweepOptions

    p = sub.add_parser(
        "sweep",
        help="hyper-parameter search over fine-tune settings with Ray Tune (the BERT paper's grid, ASHA)",
        description="Search fine-tune settings on one task: every trial is a `bertflow finetune` run into "
        "--out/trials/<name>/, the best settings are re-run over --seeds into --out/best/; trials.csv, "
        "sweep.json and sweep.png summarise it, one MLflow parent run holds it. Re-running the same "
        "command resumes a killed sweep without training finished trials again.",
    )
    add_dataclass_arguments(p, FinetuneConfig, required=("task", "data", "checkpoint", "out"), skip=("seeds",),
                            help={"task": "task name (a row of the task table, e.g. mrpc, rte, cola, sst2)",
                                  "data": "the task's data dir, or a datasets root that holds it",
                                  "checkpoint": "starting checkpoint: a bertflow or Hugging Face BERT dir",
                                  "max_train_examples": "train on the first N examples only",
                                  "max_eval_examples": "evaluate on the first N examples of each eval split only",
                                  "out": "output dir: trials/, best/, trials.csv, sweep.json, sweep.png",
                                  "seed": "every trial's seed",
                                  "log_model": "log the re-runs' checkpoints as mlflow.pyfunc models (trials never)"})
    add_dataclass_arguments(p, SweepOptions, help={
        "grid": "a named grid: paper (batch 16, 32 x lr 5e-5, 3e-5, 2e-5 x epochs 2, 3, 4)",
        "space": "YAML file: setting -> {choice|grid: [values]} or {uniform|loguniform: [low, high]}",
        "num_samples": "samples of the space (the grid repeated that often)",
        "scheduler": "none (every trial runs its epochs) or asha (early stopping on the dev metric per epoch)",
        "grace_period": "asha: epochs every trial runs before it may be stopped",
        "reduction_factor": "asha: the best 1/rf of the trials at each rung go on",
        "max_concurrent": "trials at once (default: from the cluster; 1 on a single machine)",
        "seeds": "seeds of the best settings' re-runs, e.g. 1,2,3; none: no re-run",
        "search_seed": "seed of the sampled (choice, uniform, loguniform) settings",
        "trial_retries": "times a trial whose process died is started again (it resumes its last epoch)",
        "keep_trial_checkpoints": "keep each trial's checkpoint/ (default: only metrics and predictions)",
    })
    from pipelines.commands.finetune import add_allow_new_labels

    add_allow_new_labels(p)
    p.set_defaults(handler=run_sweep_command)


def run_sweep_command(args: argparse.Namespace) -> int:
    from pipelines.config_args import dataclass_from_args
    from pipelines.jobs.configs import FinetuneConfig
    from pipelines.jobs.sweep_space import SweepOptions, resolve_space

    base = dataclass_from_args(FinetuneConfig, args, seeds=None)
    options = dataclass_from_args(SweepOptions, args)
    space = resolve_space(options, base)  # a bad space file fails here, before Ray Tune and torch load
    from pipelines.preflight import check_finetune_start

    check_finetune_start(base, args.allow_new_labels)  # data, labels, output, tracking: before Ray or --out
    from pipelines.jobs.sweep import run_sweep

    result = run_sweep(base, options, space)
    print(f"[sweep] outputs in {base.out}: trials.csv, sweep.json, sweep.png"
          + (", best/" if result["rerun"] else ""), flush=True)
    return 0
