"""The `evaluate_checkpoints` stage: downstream score along a pretraining run, the curve users want.

    curves:
      kind: evaluate_checkpoints
      inputs: {pretrain: pretrain}     # a pretrain stage (its `checkpoints/`), or a `checkpoints` path or URI
      config:
        every: 2                       # every k-th kept checkpoint by step (the last one always)
        seeds: [1, 2, 3]
        data: "${BERTFLOW_DATASETS}"    # a datasets root or task dir (or a path inside a `data` input)
        tasks: {sst2: {epochs: 1}, mrpc: {epochs: 3}}   # per-task fine-tune settings, as a finetune stage
        learning_rate: 5.0e-5          # and any fine-tune setting shared by the tasks
        random_init: true              # the same fine-tunes from a random init of the same shape: the floor
        max_concurrent: 2              # fine-tune jobs at once

Every selected checkpoint x task is one `bertflow finetune` job over the seeds (one Ray Train start
for its seeds), run as Ray tasks, `max_concurrent` at a time. The jobs' outputs are cached per
checkpoint, outside the stage's own dir, in `<workdir>/evaluate_checkpoints/_cache/<checkpoint
content hash>/<task>-<settings hash>/`: a checkpoint is known by the sha256 of its weights and
config, a fine-tune by its settings and seeds, so choosing other checkpoints (`every`), adding a
task or re-running after a kill fine-tunes only what was not finished before (a killed job itself
resumes at its seed and epoch). The random init (`random_init_seed`, the shape of the run's
checkpoints, their tokenizer) is cached the same way, in `_cache/random-init-<shape and seed hash>/`.

A pretrain stage publishes the checkpoints its run kept (`checkpoint_every`, `keep_checkpoints`:
set them before pretraining for the points you want). A `checkpoints` path is a dir of `step-*`
training checkpoints, such as a pretrain job's `<out>/_ray/train`; it may be an object-store URI
(its key then holds the objects' names, sizes and Last-Modified times, as `graph.path_fingerprint` does for
every input path or URI of a spec).

A workdir on an object store (`workdir: s3://...`): everything goes through `bert/storage.py`. The
cache is a prefix beside the stage's output, and each fine-tune job writes its output there itself
(`--out s3://...`); a job is cached when its `metrics.json`, written last, exists. The stage reads
the pretrain stage's checkpoints from its local copy (steps, content hashes) but hands the fine-tunes,
Ray tasks on any node, their URIs as published (`StageContext.sources`). The random init is built in
a local temporary dir, uploaded, and complete only once its `_manifest.json`, written last, exists
(locally: written under a temporary name and renamed into place).

MLflow: the stage's run is the parent of every fine-tune job's run (and those of their seeds); it
gets the curve as metrics (`<task>/<metric>` at each pretraining step, `<task>/random_init`) and
the plot. Output dir: `curves.json` (per checkpoint: step, tokens seen, per task the mean, std and
per-seed scores, cached or not), `curves.png` (score against step and against tokens, ± std, the
random-init score as a horizontal line).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert import storage
from bert.errors import InputError
from pipelines.dag.graph import MANIFEST, path_fingerprint, require_paths, sibling

SET_BY_PIPELINE = ("task", "data", "checkpoint", "out", "tokenizer", "seed", "seeds", "tracking_uri",
                   "parent_run_id", "experiment")
CACHE = "_cache"


@dataclass(frozen=True)
class EvaluateStageConfig:
    """The stage's own settings; the rest of its section is shared `FinetuneConfig` settings."""

    tasks: dict[str, Any]
    seeds: tuple[int, ...] = (1,)
    every: int = 1
    checkpoints: str | None = None  # a dir (or URI) of step-* checkpoints, when there is no `pretrain` input
    data: str | None = None
    random_init: bool = True
    random_init_seed: int = 12345
    max_concurrent: int = 2  # speed only: not in the key


@dataclass(frozen=True)
class EvaluateNode:
    section: EvaluateStageConfig
    tasks: dict[str, Any]  # entry -> FinetuneConfig without paths, seeds set
    data: dict[str, str | None]  # entry -> its data (a path, or a path inside the `data` input)
    data_is_input: bool


# ----------------------------------------------------------------------------- configure


def configure_evaluate(w) -> list:
    """Parse the section once: every task's fine-tune config is checked before anything runs."""
    from pipelines.config_args import construct, split_section
    from pipelines.dag.graph import task_seed_section
    from pipelines.dag.spec import expand_path
    from pipelines.jobs.configs import FinetuneConfig

    own, shared = task_seed_section(w.spec.config, [EvaluateStageConfig, FinetuneConfig], w.text, SET_BY_PIPELINE)
    section = EvaluateStageConfig(**own)
    if section.every < 1 or section.max_concurrent < 1:
        raise InputError(f"{w.text}: every and max_concurrent must be >= 1")
    if ("pretrain" in w.inputs) == (section.checkpoints is not None):
        raise InputError(f"{w.text}: give the checkpoints either as input `pretrain` (a pretrain stage) or as a "
                         "`checkpoints` path (a dir of step-* checkpoints), exactly one")
    checkpoint_files = None
    if section.checkpoints:
        section = dataclasses.replace(section, checkpoints=expand_path(section.checkpoints))
        require_paths([section.checkpoints], f"{w.text}.checkpoints")
        checkpoint_files = path_fingerprint([section.checkpoints])
    data_is_input = "data" in w.inputs
    tasks, data, fields = {}, {}, {}
    for entry, settings in section.tasks.items():
        where = f"{w.text}.tasks.{entry}"
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", entry):
            raise InputError(f"{where}: a task entry name must be letters, digits, '_' or '-'")
        settings = dict(settings or {})
        task = settings.pop("task", entry)
        data[entry] = settings.pop("data", section.data)
        (overrides,) = split_section(settings, [FinetuneConfig], where, excluded=SET_BY_PIPELINE)
        config = construct(FinetuneConfig, {"task": task, **shared, **overrides,
                                            "seeds": ",".join(map(str, section.seeds))}, where)
        _check_task(task, where)
        if data[entry] is None and not data_is_input:
            raise InputError(f"{where}: no data: set `data` (a task dir or datasets root) or give a `data` input")
        if not data_is_input:
            data[entry] = expand_path(data[entry])
            require_paths([data[entry]], where)
        tasks[entry] = config
        fields[entry] = _job_settings(config) | ({"data": {"input": data[entry]}} if data_is_input else
                                                 {"data": data[entry], "files": path_fingerprint([data[entry]])})
    key = {k: v for k, v in dataclasses.asdict(section).items() if k not in ("tasks", "max_concurrent")}
    key |= {"tasks": fields}
    if section.checkpoints:
        key |= {"checkpoint_files": checkpoint_files}
    return [w.stage(EvaluateNode(section, tasks, data, data_is_input), key)]


def _job_settings(config) -> dict[str, Any]:
    from pipelines.jobs.configs import result_settings

    return {k: v for k, v in result_settings(config).items() if k not in ("data", "checkpoint", "out", "tokenizer")}


def _check_task(task: str, where: str) -> None:
    from bert.tasks import get_task

    try:
        get_task(task)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(root: storage.Location) -> list[Any]:
    """The complete training checkpoints under `root` (`step-*` dirs, or prefixes on an object store), by step."""
    from bert.pretrain import TrainState

    if not storage.is_dir(root):
        return []
    found = [storage.join(root, n) for n in storage.list_dir(root) if n.startswith("step-")]
    found = [d for d in found if TrainState.complete(d)]
    return sorted(found, key=lambda d: TrainState.read(d).step)


def select(checkpoints: list[Any], every: int) -> list[Any]:
    """Every `every`-th checkpoint by step, and always the last one."""
    chosen = checkpoints[every - 1 :: every]
    if checkpoints and checkpoints[-1] not in chosen:
        chosen.append(checkpoints[-1])
    return chosen


def content_id(checkpoint: storage.Location) -> str:
    """A checkpoint's identity: sha256 of its config and weights (whatever dir or prefix it lies in)."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with storage.open_read(storage.join(checkpoint, name)) as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def settings_id(config) -> str:
    payload = json.dumps(_job_settings(config), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def random_init_checkpoint(like: Path, seed: int, cache: storage.Location) -> storage.Location:
    """A randomly initialised model of `like`'s shape (and tokenizer; `like` a local dir), seeded, cached by its
    shape and seed under `cache` (a dir, or a prefix on an object store), visible only whole."""
    import torch

    from bert.checkpoint import read_checkpoint_info, save_pretrained
    from bert.model import BertForPreTraining

    config = read_checkpoint_info(like).config
    name = hashlib.sha256(json.dumps([config.to_dict(), seed], sort_keys=True).encode()).hexdigest()[:16]
    home = storage.join(cache, f"random-init-{name}")
    out, remote = storage.join(home, "checkpoint"), storage.is_remote(cache)
    # locally the dir is renamed into place whole; on a store its manifest is written after every file
    if storage.is_file(storage.join(home, MANIFEST) if remote else storage.join(out, "model.safetensors")):
        return out
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForPreTraining(config)
    if not remote:
        storage.make_dirs(home)
        save_pretrained(model, out, tokenizer_dir=like)  # written under a temporary name, renamed into place
        return out
    with tempfile.TemporaryDirectory(prefix="bertflow-random-init-") as tmp:
        save_pretrained(model, Path(tmp) / "checkpoint", tokenizer_dir=like)
        # a killed upload's objects (no manifest) are overwritten: the same shape and seed give the same files
        storage.upload_dir(Path(tmp) / "checkpoint", out)
        files = dict(storage.walk_files(Path(tmp) / "checkpoint"))
    storage.write_json(storage.join(home, MANIFEST), {"seed": seed, "config": config.to_dict(), "files": files})
    return out


# ----------------------------------------------------------------------------- running


def finetune_job(config, checkpoint: str, data: str, out: str, tracking: dict[str, Any]) -> dict[str, Any]:
    """One task over the seeds from one checkpoint (a Ray task); `cached` when it had finished before."""
    from pipelines.jobs.finetune import run_finetune

    cached = storage.is_file(storage.join(out, "metrics.json"))  # written last by a job that finished
    result = run_finetune(dataclasses.replace(config, checkpoint=checkpoint, data=data, out=out, log_model=False,
                                              **tracking))
    primary = result["primary_metric"]
    per_seed = ({int(s): m[primary] for s, m in result["per_seed"].items()} if "per_seed" in result
                else {int(result["seed"]): result["metrics"][primary]})
    return {"primary_metric": primary, "mean": result["metrics"][primary],
            "std": (result.get("std") or {}).get(primary, 0.0), "per_seed": per_seed, "cached": cached}


def run_jobs(jobs: list[dict[str, Any]], max_concurrent: int) -> list[dict[str, Any]]:
    """`finetune_job` for every job as Ray tasks (no CPU of their own: their Ray Train workers hold them)."""
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(finetune_job)
    pending, results = {}, {}
    for i, job in enumerate(jobs):
        if len(pending) >= max_concurrent:
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
        pending[task.remote(job["config"], job["checkpoint"], job["data"], job["out"], job["tracking"])] = i
    for ref, i in pending.items():
        results[i] = ray.get(ref)
    return [results[i] for i in range(len(jobs))]


def evaluate_stage(ctx) -> dict[str, Any]:
    """Fine-tune every selected checkpoint (and the random init) on every task; write the curves."""
    node: EvaluateNode = ctx.config
    section = node.section
    # `here`: what this stage reads (a pretrain input's local copy, for a workdir on a store); `there`: the same
    # checkpoints as published, what the fine-tunes (Ray tasks, on any node) are given
    if section.checkpoints:
        here = there = section.checkpoints
    else:
        here, there = ctx.inputs["pretrain"] / "checkpoints", storage.join(ctx.sources["pretrain"], "checkpoints")
    available = checkpoint_dirs(here)
    if not available:
        raise InputError(f"{there}: no complete step-* checkpoints to evaluate (a pretrain stage publishes the "
                         "ones its run kept: see checkpoint_every and keep_checkpoints)")
    chosen = select(available, section.every)
    cache = sibling(ctx.final, CACHE)  # <workdir>/evaluate_checkpoints/_cache: a dir, or a prefix on a store
    points = [_point(d, storage.join(there, storage.name(d))) for d in chosen]
    if section.random_init:
        like = storage.local_copy(chosen[-1], "checkpoints")  # itself, unless `checkpoints` is a URI
        random_init = random_init_checkpoint(like, section.random_init_seed, cache)
        points.append({"label": "random_init", "dir": random_init, "location": random_init, "step": None,
                       "tokens": None})
    jobs = []
    for point in points:
        point["id"] = content_id(point["dir"])
        for entry, config in node.tasks.items():
            data = (str(storage.join(ctx.sources["data"], node.data[entry] or "")) if node.data_is_input
                    else node.data[entry])
            out = storage.join(cache, point["id"], f"{entry}-{settings_id(config)}")
            jobs.append({"point": point, "entry": entry, "config": config, "checkpoint": str(point["location"]),
                         "data": data, "out": str(out), "tracking": ctx.job_tracking()})
    ctx.log(f"{len(chosen)} of {len(available)} checkpoints{' and a random init' if section.random_init else ''} "
            f"x {len(node.tasks)} task(s) x {len(section.seeds)} seed(s): {len(jobs)} fine-tune jobs")
    for job, result in zip(jobs, run_jobs(jobs, section.max_concurrent)):
        job["point"].setdefault("tasks", {})[job["entry"]] = result
    curves = _write_outputs(Path(ctx.out), points, node)
    _log_to_mlflow(ctx, curves, Path(ctx.out) / "curves.png")
    cached = sum(r["cached"] for p in points for r in p["tasks"].values())
    return {"checkpoints": len(chosen), "jobs": len(jobs), "cached_jobs": cached,
            "final": {e: points[len(chosen) - 1]["tasks"][e]["mean"] for e in node.tasks},
            "mlflow": dict(ctx.tracking) if ctx.tracking else None}


def _point(checkpoint: storage.Location, location: storage.Location) -> dict[str, Any]:
    """A checkpoint read here at `checkpoint`, given to the fine-tunes as `location`."""
    from bert.pretrain import TrainState

    state = TrainState.read(checkpoint)
    return {"label": storage.name(checkpoint), "dir": checkpoint, "location": location, "step": state.step,
            "tokens": state.tokens_seen}


# ----------------------------------------------------------------------------- outputs


def _write_outputs(out: Path, points: list[dict[str, Any]], node: EvaluateNode) -> dict[str, Any]:
    curves = {"seeds": list(node.section.seeds), "tasks": {}}
    for entry in node.tasks:
        rows = [{"checkpoint": p["label"], "content_id": p["id"], "step": p["step"], "tokens": p["tokens"],
                 **p["tasks"][entry]} for p in points]
        curves["tasks"][entry] = {"primary_metric": rows[0]["primary_metric"],
                                  "points": [r for r in rows if r["checkpoint"] != "random_init"],
                                  "random_init": next((r for r in rows if r["checkpoint"] == "random_init"), None)}
    (out / "curves.json").write_text(json.dumps(curves, indent=2, default=str) + "\n")
    plot_curves(out / "curves.png", curves)
    return curves


def plot_curves(path: Path, curves: dict[str, Any]) -> None:
    """Per task: score against pretraining step and against tokens seen (± std), random init as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = curves["tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.6 * len(tasks)), squeeze=False)
    for row, (entry, task) in zip(axes, tasks.items()):
        points = task["points"]
        for ax, x_key, x_label in zip(row, ("step", "tokens"), ("pretraining step", "tokens seen")):
            ax.errorbar([p[x_key] for p in points], [p["mean"] for p in points], yerr=[p["std"] for p in points],
                        marker="o", capsize=3, label="pretrained checkpoint")
            if task["random_init"]:
                r = task["random_init"]
                ax.axhline(r["mean"], color="grey", linestyle="--", label=f"random init ({r['mean']:.4f})")
            ax.set_xlabel(x_label)
            ax.set_ylabel(task["primary_metric"])
            ax.set_title(f"{entry}: mean ± std over seeds {curves['seeds']}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _log_to_mlflow(ctx, curves: dict[str, Any], png: Path) -> None:
    """The curve into the stage's run (the parent of the fine-tune runs): one metric per task, step = pretraining step."""
    if not ctx.tracking:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ctx.tracking["tracking_uri"])
    run_id = ctx.tracking["run_id"]
    for entry, task in curves["tasks"].items():
        key = f"{entry}/{task['primary_metric']}"
        for p in task["points"]:
            client.log_metric(run_id, key, p["mean"], step=int(p["step"]))
        if task["random_init"]:
            client.log_metric(run_id, f"{entry}/random_init", task["random_init"]["mean"], step=0)
    client.log_artifact(run_id, str(png))
