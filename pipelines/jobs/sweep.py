"""`bertflow sweep`: a hyper-parameter search on Ray Tune in which every trial is `run_finetune`.

Driver, top to bottom (`run_sweep`):

    space, trials   the space (`--grid paper` or `--space FILE`) checked and expanded into named trials
                    (`pipelines/jobs/sweep_space.py`); every trial's settings checked; the task, data and
                    checkpoint checked once (`preflight`) -- all before anything is written
    own_dir         claim and lock --out; a different sweep there is refused, the same one resumes
    Tuner.fit       one Tune trial per trial: `_trial` (below); FIFO or ASHA on the task's primary dev
                    metric, reported after every epoch; a trial whose process dies is retried
    best            the trial with the highest dev metric (the best epoch of each trial, as the paper does)
    re-runs         its settings fine-tuned again over --seeds into best/ (mean +- std)
    outputs         trials.csv, sweep.json (written last: the sweep is done), sweep.png; MLflow

A trial (`_trial`, inside a Tune actor that reserves ~0 CPU; its Ray Train workers hold the CPUs):
a trial already finished (its fine-tune dir has metrics.json) or stopped early (its record says so)
replays its per-epoch results to Tune and returns, so a re-run sweep trains nothing twice and ASHA
sees the same results; otherwise it replays the epochs its own checkpoint holds (after a kill) and
calls `run_finetune(config, ray_callbacks=[TuneReportCallback()])`, which resumes from there. The
driver's `_Recorder` (a Tune callback) writes each trial's results to `trials/<name>.json` as they
come, and at the trial's end whether it finished or was stopped.

Output dir:
    trials/<name>/      the trial's fine-tune output dir (metrics.json, predictions.jsonl; checkpoint/ with
                        --keep-trial-checkpoints); a stopped trial keeps only its record and MLflow run
    trials/<name>.json  its settings, per-epoch results, status (running | finished | stopped | error), seconds
    best/               the best settings re-run over --seeds (a normal fine-tune output dir)
    trials.csv          one row per trial: settings, dev metric, best epoch, epochs run, stopped early, time
    sweep.json          the table, the best trial, the re-runs' mean and std, compute used, identity
    sweep.png           the dev metric against each swept setting
    mlflow_run.json, _job.json, _tune/ (Tune's own state, removed at the end)
MLflow: one parent run; every trial's fine-tune run nested under it (named and tagged with the
trial's settings; a stopped trial's run ends KILLED); the re-runs nested under it too.

--out may be an object-store URI (`s3://...`): the same layout lives under it, read and written through
`bert/storage.py`. The sweep holds the output's lease (`pipelines/lease.py`) and commits sweep.json behind its
fence; every trial is a fine-tune with its own `--out` under trials/, so its checkpoints, resume and lease are the
fine-tune's own on the store; the trial records are single PUTs; Tune's own state (`_tune/`, scratch the sweep
deletes at its end) stays in this machine's cache; the MLflow artifacts go under `<out>/mlartifacts/`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from bert import finetune, storage
from bert.errors import BertflowError, InputError
from bert.finetune import FinetuneState
from bert.tasks import get_task
from pipelines.jobs.configs import FinetuneConfig
from pipelines.jobs.finetune import (
    BEST,
    METRICS,
    RAY_STORAGE,
    STAGING,
    latest_epoch_checkpoint,
    preflight,
    run_finetune,
    seed_storage,
)
from pipelines.jobs.sweep_space import (
    SweepOptions,
    describe_settings,
    expand,
    resolve_space,
    space_dict,
    sweep_identity,
)
from pipelines.jobs.skeleton import Claimed, Job, run_job
from pipelines.outdir import hold_writer
from pipelines.tracking import MetricLogger, finish_run

TRIALS = "trials"
RERUN = "best"
TUNE_DIR = "_tune"
SWEEP_FILE = "sweep.json"
TABLE = "trials.csv"
PLOT = "sweep.png"
DONE = ("finished", "stopped")


class TrialsFailed(BertflowError):
    """Some trials failed after their retries (or the search was interrupted); a re-run resumes them."""


# ----------------------------------------------------------------------------- driver


class SweepJob(Job[FinetuneConfig]):
    """`run_job(SweepJob(options, space), base)`: the skeleton's steps for a sweep (`pipelines/jobs/skeleton.py`)."""

    name = "sweep"
    required = ("data", "checkpoint", "out")
    paths = ("data", "checkpoint", "out", "tokenizer")

    def __init__(self, options: SweepOptions, space=None):
        self.options, self.space, self.plans = options, space, []

    def settle(self, base: FinetuneConfig) -> None:
        """The space (`--grid` / `--space`) expanded into named trials, each trial's settings checked."""
        self.space = self.space if self.space is not None else resolve_space(self.options, base)
        self.plans = expand(self.space, self.options.num_samples, self.options.search_seed)
        for plan in self.plans:
            _with_settings(base, plan)  # each trial's settings together pass FinetuneConfig's checks

    def identity(self, base: FinetuneConfig) -> dict[str, Any]:
        return sweep_identity(base, self.options, self.space)

    def finished(self, base: FinetuneConfig) -> dict[str, Any] | None:
        return _finished_sweep(base.out, self.identity(base))

    def preflight(self, base: FinetuneConfig) -> None:
        _preflight(base, self.plans)

    def inputs(self, base: FinetuneConfig) -> list[Any]:
        return [base.data, base.checkpoint, base.tokenizer]

    def run_name(self, base: FinetuneConfig) -> str:
        return f"sweep-{base.task}"

    def tags(self, base: FinetuneConfig) -> dict[str, str]:
        return {"bertflow.stage": "sweep", "bertflow.task": base.task}

    def run(self, claimed: Claimed[FinetuneConfig], checked) -> dict[str, Any]:
        """Search, collect the table, re-run the best settings over seeds, write the outputs."""
        base, out, parent, options = claimed.config, claimed.out, claimed.run, self.options
        ctx = {"base": base.to_dict(), "out": str(out), "tracking_uri": claimed.tracking_uri,
               "parent_run_id": parent.run_id if parent else base.parent_run_id,
               "metric": get_task(base.task).primary_metric, "env": storage.environment()}
        started = time.time()
        _search(ctx, options, self.plans)
        search_seconds = time.time() - started
        rows = _collect(ctx, self.plans, options)
        best = max((r for r in rows if _finite(r["metric"])), key=lambda r: r["metric"])
        rerun = _rerun(ctx, best, options.rerun_seeds)
        result = _write_outputs(ctx, base, options, self.space, rows, best, rerun, search_seconds,
                                self.identity(base), parent, claimed.lease)
        finish_run(parent)
        shutil.rmtree(tune_dir(ctx), ignore_errors=True)
        return result


def run_sweep(base: FinetuneConfig, options: SweepOptions, space=None) -> dict[str, Any]:
    """Check, claim --out, search with Ray Tune, re-run the best settings over seeds, write the outputs.

    `base` is the fixed part of every trial (its `out` is the sweep's); `space` defaults to the one
    `options` names. Returns sweep.json's content.
    """
    return run_job(SweepJob(options, space), dataclasses.replace(base, seeds=None))


def _with_settings(base: FinetuneConfig, plan: dict[str, Any]) -> FinetuneConfig:
    try:
        return dataclasses.replace(base, **plan["settings"])
    except InputError as exc:
        raise InputError(f"sweep: {plan['name']} ({describe_settings(plan['settings'])}): {exc}") from None


def _preflight(base: FinetuneConfig, plans: list[dict[str, Any]]) -> None:
    """The task, data and checkpoint once; the model inputs for every swept sequence length / frozen layers."""
    preflight(base)
    spec = get_task(base.task)
    checked = {(base.max_seq_length, base.freeze_layers)}
    for plan in plans:
        config = _with_settings(base, plan)
        if (config.max_seq_length, config.freeze_layers) not in checked:
            checked.add((config.max_seq_length, config.freeze_layers))
            finetune.check_model_inputs(config.checkpoint, config.tokenizer or config.checkpoint, spec,
                                        config.max_seq_length, config.freeze_layers)


def _finished_sweep(out: storage.Location, identity: dict[str, Any]) -> dict[str, Any] | None:
    path = storage.join(out, SWEEP_FILE)
    if not storage.is_file(path):
        return None
    done = storage.read_json(path)
    return done if done.get("identity") == json.loads(json.dumps(identity)) else None


def tune_dir(ctx: dict[str, Any]) -> Path:
    """Ray Tune's own state: `<out>/_tune`, or for an --out on an object store a dir in this machine's cache (scratch
    the sweep removes at its end; what a resume needs lives in the trial records and the trials' own outputs)."""
    out = ctx["out"]
    return storage.cache_dir("tune", out) if storage.is_remote(out) else Path(out) / TUNE_DIR


def default_concurrency(base: FinetuneConfig) -> int:
    """Trials at once: GPUs / workers per trial; on one machine 1 (a fine-tune's torch threads take every
    core); on a cluster its CPUs / CPUs per trial."""
    resources = ray.cluster_resources()
    if base.use_gpu:
        return max(1, int(resources.get("GPU", 0) // base.num_workers))
    if len([n for n in ray.nodes() if n.get("Alive")]) <= 1:
        return 1
    return max(1, int(resources.get("CPU", 1) // (base.num_workers * base.cpus_per_worker)))


def _search(ctx: dict[str, Any], options: SweepOptions, plans: list[dict[str, Any]]) -> None:
    """One Tune run over the trials (a grid over their names and settings); the trials do the rest."""
    out = ctx["out"]
    base = FinetuneConfig(**ctx["base"])
    budgets = [math.ceil(_with_settings(base, p).epochs) for p in plans]
    tune_plans = [p | {"budget": b} for p, b in zip(plans, budgets)]
    scheduler = None
    if options.scheduler == "asha":
        scheduler = BudgetASHA(time_attr="epoch", max_t=max(budgets), grace_period=options.grace_period,
                               reduction_factor=options.reduction_factor)
    replayed = {p["name"] for p in plans if _completed(ctx, p) is not None}
    concurrency = options.max_concurrent or default_concurrency(base)
    print(f"[sweep] {len(plans)} trials ({len(replayed)} done before), {options.scheduler} scheduler, "
          f"{concurrency} at a time; outputs in {out}", flush=True)
    shutil.rmtree(tune_dir(ctx), ignore_errors=True)
    tuner = tune.Tuner(
        # The trial runs only the fine-tune's driver: it holds no CPU (a sliver of one left a worker that needs
        # a whole node's CPUs unplaceable for ever), and Tune needs some resource in its bundle: a byte of memory.
        tune.with_resources(tune.with_parameters(_trial, ctx=ctx), {"CPU": 0, "memory": 1}),
        param_space={"plan": tune.grid_search(tune_plans)},
        tune_config=tune.TuneConfig(metric=ctx["metric"], mode="max", scheduler=scheduler,
                                    max_concurrent_trials=concurrency, reuse_actors=False,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name="sweep", storage_path=str(tune_dir(ctx)), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=options.trial_retries),
                                  callbacks=[_Recorder(ctx, replayed)]),
    )
    tuner.fit()


def _trial_name(trial) -> str:
    return trial.config["plan"]["name"]


class BudgetASHA(ASHAScheduler):
    """ASHA that never stops a trial at its own last epoch: it is then writing its outputs, and stopping
    it would save nothing but lose them. (The rung result is recorded all the same.)"""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if result.get("epoch", 0) >= trial.config["plan"]["budget"]:
            return TrialScheduler.CONTINUE
        return action


# ----------------------------------------------------------------------------- one trial (in a Tune actor)


def trial_config(ctx: dict[str, Any], plan: dict[str, Any]) -> FinetuneConfig:
    """The trial's fine-tune: the fixed settings, the trial's own, its dir, nested under the sweep's run."""
    return FinetuneConfig(**{**ctx["base"], **plan["settings"], "seeds": None, "log_model": False,
                             "out": str(storage.join(ctx["out"], TRIALS, plan["name"])),
                             "tracking_uri": ctx["tracking_uri"], "parent_run_id": ctx["parent_run_id"]})


def _trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    os.environ.update(ctx.get("env") or {})  # the driver's store and credentials (its trial actors may not have them)
    if not storage.is_remote(ctx["out"]):  # on a store, each trial's fine-tune holds its own lease instead
        hold_writer(ctx["out"])  # a later sweep cannot claim the dir while this trial's process lives
    plan = config["plan"]
    completed = _completed(ctx, plan)
    if completed is not None:  # finished or stopped before: its results again, nothing trained
        for row in completed[1]:
            tune.report(row)
        return
    finetune_config = trial_config(ctx, plan)
    resume = latest_epoch_checkpoint(seed_storage(finetune_config, finetune_config.seed))
    if resume is not None:  # the epochs a killed run finished: reported again, then trained on from there
        for row in history_rows(FinetuneState.read(resume).history):
            tune.report(row)
    run_finetune(finetune_config, ray_callbacks=[TuneReportCallback()])


def _completed(ctx: dict[str, Any], plan: dict[str, Any]) -> tuple[str, list[dict]] | None:
    """("finished" | "stopped", per-epoch rows) of a trial done before, else None."""
    config = trial_config(ctx, plan)
    metrics_file = storage.join(config.out, METRICS)
    if storage.is_file(metrics_file):
        metrics = storage.read_json(metrics_file)
        if metrics.get("identity") == config.identity():
            return "finished", history_rows(metrics["history"])
    record = read_record(ctx["out"], plan["name"])
    if record and record.get("status") == "stopped" and record.get("settings") == plan["settings"]:
        return "stopped", record["results"]
    return None


def history_rows(history: list[dict]) -> list[dict[str, Any]]:
    """A fine-tune's per-epoch history as the rows it reported to Tune: epoch, step, dev metrics."""
    return [{"epoch": e["epoch"], "step": e["step"], **{k: v for k, v in e["metrics"].items() if _finite(v)}}
            for e in history]


def read_record(out: storage.Location, name: str) -> dict[str, Any] | None:
    path = storage.join(out, TRIALS, f"{name}.json")
    return storage.read_json(path) if storage.is_file(path) else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------- the driver's record of each trial


class _Recorder(tune.Callback):
    """Writes `trials/<name>.json` as results come (a killed sweep keeps them); names and tags the trial's
    MLflow run; prints one line per epoch and per trial end. Replayed trials are left as they were."""

    def __init__(self, ctx: dict[str, Any], replayed: set[str]):
        self.ctx, self.out, self.replayed = ctx, ctx["out"], replayed
        self.rows: dict[str, dict[int, dict]] = {}
        self.started: dict[str, float] = {}
        self.tagged: set[str] = set()

    def on_trial_start(self, iteration, trials, trial, **info):
        name = _trial_name(trial)
        if name not in self.replayed and name not in self.started:
            self.started[name] = time.time()
            record = read_record(self.out, name) or {}
            self.rows[name] = {r["epoch"]: r for r in record.get("results", [])}
            self.started[name] -= record.get("seconds", 0.0)  # earlier runs of this trial count too
            print(f"[sweep] {name} ({describe_settings(trial.config['plan']['settings'])}) started", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        name = _trial_name(trial)
        if name in self.replayed or "epoch" not in result:
            return
        row = {"epoch": result["epoch"], "step": result.get("step"),
               **{k: v for k, v in result.items() if "/" in k and not k.startswith("config") and _finite(v)}}
        self.rows.setdefault(name, {})[row["epoch"]] = row
        self._write(name, trial, "running")
        if name not in self.tagged:
            self._mlflow(name, trial, None)
        value = row.get(self.ctx["metric"])
        print(f"[sweep] {name}: epoch {row['epoch']} {self.ctx['metric']} "
              f"{'n/a' if value is None else f'{value:.4f}'}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        name = _trial_name(trial)
        if name in self.replayed:
            return
        finished = storage.is_file(storage.join(self.out, TRIALS, name, METRICS))
        status = "finished" if finished else "stopped"
        self._write(name, trial, status)
        self._mlflow(name, trial, status)
        epochs = max(self.rows.get(name) or {0: None})
        print(f"[sweep] {name} {'finished' if finished else 'stopped early'} after epoch {epochs}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        name = _trial_name(trial)
        self._write(name, trial, "error")
        print(f"[sweep] {name} FAILED (after its retries): see {trial.error_file or 'the log above'}", flush=True)

    def _write(self, name: str, trial, status: str) -> None:
        storage.write_json(storage.join(self.out, TRIALS, f"{name}.json"), {  # whole or not at all
            "name": name, "settings": trial.config["plan"]["settings"], "status": status,
            "results": [self.rows[name][e] for e in sorted(self.rows.get(name, {}))],
            "seconds": time.time() - self.started.get(name, time.time())})

    def _mlflow(self, name: str, trial, status: str | None) -> None:
        """Name the trial's run after it and tag its settings (first result); its status at the end."""
        run_file = storage.join(self.out, TRIALS, name, "mlflow_run.json")
        try:
            if not storage.is_file(run_file):
                return
            from mlflow.tracking import MlflowClient

            run = storage.read_json(run_file)
            client = MlflowClient(run["tracking_uri"])
            if status is None:
                client.update_run(run["run_id"], name=name)
                for key, value in trial.config["plan"]["settings"].items():
                    client.set_tag(run["run_id"], f"bertflow.sweep.{key}", str(value))
                client.set_tag(run["run_id"], "bertflow.sweep.trial", name)
                self.tagged.add(name)
            else:
                client.set_tag(run["run_id"], "bertflow.sweep.status", status)
                if status == "stopped":
                    client.set_terminated(run["run_id"], status="KILLED")
        except Exception as exc:  # noqa: BLE001 - tracking must never fail the sweep
            warnings.warn(f"could not tag the MLflow run of {name}: {exc}", stacklevel=2)


# ----------------------------------------------------------------------------- results


def _collect(ctx: dict[str, Any], plans: list[dict[str, Any]], options: SweepOptions) -> list[dict[str, Any]]:
    """One table row per trial, from its output; TrialsFailed if any trial is not done. Tidies done trials' dirs."""
    out, metric = ctx["out"], ctx["metric"]
    rows, missing = [], []
    for plan in plans:
        completed = _completed(ctx, plan)
        if completed is None:
            missing.append(plan["name"])
            continue
        status, results = completed
        directory = storage.join(out, TRIALS, plan["name"])
        for name in ((RAY_STORAGE, BEST, STAGING) if status == "stopped" else
                     (() if options.keep_trial_checkpoints else ("checkpoint",))):
            storage.remove(storage.join(directory, name))
        values = [r.get(metric, -math.inf) for r in results]
        best = max(range(len(values)), key=values.__getitem__) if values else None
        budget = math.ceil(trial_config(ctx, plan).epochs)
        epochs = max((r["epoch"] for r in results), default=0)
        rows.append({"trial": plan["name"], **plan["settings"], "metric": values[best] if values else math.nan,
                     "best_epoch": results[best]["epoch"] if values else None, "epochs_run": epochs,
                     "epochs_planned": budget, "stopped_early": status == "stopped" and epochs < budget,
                     "status": status, "seconds": round((read_record(out, plan["name"]) or {}).get("seconds", 0.0), 1)})
    if missing:
        raise TrialsFailed(f"sweep: {len(missing)} of {len(plans)} trials did not finish ({', '.join(missing[:8])}"
                           f"{', ...' if len(missing) > 8 else ''}); run the same command again to resume them "
                           f"(the {len(plans) - len(missing)} done are kept)")
    if not any(_finite(r["metric"]) for r in rows):
        raise TrialsFailed(f"sweep: no trial reported {metric}")
    return rows


def _rerun(ctx: dict[str, Any], best: dict[str, Any], seeds: tuple[int, ...]) -> dict[str, Any] | None:
    """The best trial's settings fine-tuned over `seeds` into best/ (nested under the sweep's run)."""
    if not seeds:
        return None
    plan = {"name": best["trial"], "settings": {k: best[k] for k in _setting_keys(best)}}
    base = FinetuneConfig(**ctx["base"])
    config = dataclasses.replace(trial_config(ctx, plan), out=str(storage.join(ctx["out"], RERUN)),
                                 seeds=",".join(map(str, seeds)), log_model=base.log_model)
    print(f"[sweep] re-running the best settings ({describe_settings(plan['settings'])}) over seeds "
          f"{list(seeds)}", flush=True)
    result = run_finetune(config)
    return {"seeds": list(seeds), "settings": plan["settings"], "mean": result["metrics"],
            "std": result.get("std", {}), "dir": str(storage.join(ctx["out"], RERUN))}


ROW_KEYS = ("trial", "metric", "best_epoch", "epochs_run", "epochs_planned", "stopped_early", "status", "seconds")


def _setting_keys(row: dict[str, Any]) -> list[str]:
    return [k for k in row if k not in ROW_KEYS]


def _write_outputs(ctx, base, options, space, rows, best, rerun, search_seconds, identity, parent,
                   lease=None) -> dict[str, Any]:
    """trials.csv and sweep.png (each whole or not at all), then sweep.json: the fenced commit, written last."""
    out, metric = ctx["out"], ctx["metric"]
    spool = Path(tempfile.mkdtemp(prefix="bertflow-sweep-"))  # the files, for MLflow and the store
    try:
        return _publish(out, spool, metric, base, options, space, rows, best, rerun, search_seconds, identity,
                        parent, lease)
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def _publish(out, spool, metric, base, options, space, rows, best, rerun, search_seconds, identity, parent,
             lease) -> dict[str, Any]:
    with open(spool / TABLE, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["trial", *_setting_keys(rows[0]), metric, *ROW_KEYS[2:]])
        writer.writeheader()
        writer.writerows({**{k: v for k, v in r.items() if k != "metric"}, metric: r["metric"]} for r in rows)
    storage.write_bytes(storage.join(out, TABLE), (spool / TABLE).read_bytes())
    plot(spool / PLOT, rows, space, metric, best)
    storage.write_bytes(storage.join(out, PLOT), (spool / PLOT).read_bytes())
    compute = {"trials": len(rows), "stopped_early": sum(r["stopped_early"] for r in rows),
               "trial_epochs": sum(r["epochs_run"] for r in rows),
               "planned_trial_epochs": sum(r["epochs_planned"] for r in rows),
               "trial_seconds": round(sum(r["seconds"] for r in rows), 1),
               "search_seconds": round(search_seconds, 1)}
    result = {"task": base.task, "primary_metric": metric, "space": space_dict(space), "scheduler": options.scheduler,
              "options": dataclasses.asdict(options), "trials": rows,
              "best": {"trial": best["trial"], "settings": {k: best[k] for k in _setting_keys(best)},
                       "metric": best["metric"], "best_epoch": best["best_epoch"]},
              "rerun": rerun, "compute": compute, "config": base.to_dict(), "identity": identity,
              "mlflow": dataclasses.asdict(parent) if parent else None}
    storage.write_json(spool / SWEEP_FILE, result)
    if lease is not None:
        lease.commit(storage.join(out, SWEEP_FILE), result)  # behind the output lease's fence (a no-op locally)
    else:
        storage.write_json(storage.join(out, SWEEP_FILE), result)
    if parent is not None:
        logger = MetricLogger(parent)
        logger.log_params({"space": space_dict(space), "scheduler": options.scheduler,
                           "num_samples": options.num_samples, "fixed": identity["finetune"]})
        numbers = {f"best/{metric}": best["metric"], **{f"compute/{k}": v for k, v in compute.items()}}
        if rerun:
            numbers |= {f"rerun/mean/{k}": v for k, v in rerun["mean"].items() if _finite(v)}
            numbers |= {f"rerun/std/{k}": v for k, v in rerun["std"].items() if _finite(v)}
        logger.log_metrics(numbers, 0)
        for name in (SWEEP_FILE, TABLE, PLOT):
            logger.log_artifact(spool / name)
        logger.close()
    print(describe(result), flush=True)
    return result


def plot(path: Path, rows: list[dict[str, Any]], space, metric: str, best: dict[str, Any]) -> None:
    """The dev metric against each swept setting; stopped trials hollow, the best trial red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(space)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for stopped in (False, True):
            points = [(r[key], r["metric"]) for r in rows if r["stopped_early"] == stopped and _finite(r["metric"])]
            if points:
                ax.scatter(*zip(*points), facecolors="none" if stopped else "tab:blue", edgecolors="tab:blue",
                           label="stopped early" if stopped else "finished")
        ax.scatter([best[key]], [best["metric"]], color="tab:red", zorder=3, label="best")
        if space[key].kind == "loguniform" or key == "learning_rate":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_name(f".{path.name}.tmp.png"), dpi=100)
    plt.close(fig)
    path.with_name(f".{path.name}.tmp.png").replace(path)


def describe(result: dict[str, Any]) -> str:
    best, compute, metric = result["best"], result["compute"], result["primary_metric"]
    text = (f"[sweep] {result['task']}: best {best['trial']} ({describe_settings(best['settings'])}) {metric} "
            f"{best['metric']:.4f}; {compute['trials']} trials, {compute['stopped_early']} stopped early, "
            f"{compute['trial_epochs']}/{compute['planned_trial_epochs']} trial-epochs")
    if result["rerun"]:
        rerun = result["rerun"]
        text += (f"; re-run over seeds {rerun['seeds']}: {metric} {rerun['mean'].get(metric, math.nan):.4f} "
                 f"+- {rerun['std'].get(metric, 0.0):.4f}")
    return text
